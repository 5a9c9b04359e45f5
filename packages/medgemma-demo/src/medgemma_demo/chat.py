"""The chat behind the page and the ``/chat`` endpoint, independent of the layout.

:class:`ChatService` holds the model loader, the upload limit, the :class:`~.batching.Batcher`
that decodes the questions of many users together, and the answer in progress of each browser
session (for Stop). Its methods are the event handlers :mod:`medgemma_demo.app` wires up:
``upload`` (files -> gallery), ``submit`` + ``respond`` (a generator that streams the answer
into the chat) and ``api_chat`` (message + optional file -> the whole answer).

Two prompt modes (:attr:`ChatService.mode`): ``chat`` wraps the conversation in the
checkpoint's chat template; ``base``, for base models (the embedded Gemma 3 270M, or a
checkpoint without a chat template), writes it as a completion ("Question: ... Answer:",
:func:`~.prompting.base_prompt`) and ends the answer at a blank line or a new question, with
repetition control on. Errors reach the page as ``gradio.Error`` with one line; logs hold
counts and timings only, never text or file names.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from .backends import CoreBackend, SerialBackend
from .batching import LENGTH, Batcher, Request, Row, RowError
from .host import ChatModel, Loader, text_engine
from .prompting import BASE, BASE_STOPS, CHAT, base_prompt, messages, user_turn
from .uploads import MB, LoadedUpload, UploadError, load_uploads, parse_options

log = logging.getLogger("medgemma_demo")

#: Longest a request waits for the model to finish loading, seconds.
LOAD_WAIT_S = 1800.0
#: Upper bound of the max-new-tokens setting.
MAX_NEW_TOKENS = 2048
#: The "Read as" choice that lets the data plugins detect the modality.
AUTO = "auto"
#: Repetition control per prompt mode: (repetition penalty, no-repeat n-gram size).
REPETITION = {BASE: (1.2, 3), CHAT: (1.0, 0)}


def text_only_note(name: str, command: str = "medgemma-demo") -> str:
    return (f"**{name}** is a text-only model: uploads are shown in the gallery (what an "
            "image-text MedGemma would see) but their images are not sent. Start the demo with "
            f"`{command} --checkpoint path/to/medgemma-4b-it` for image questions.")


def has_chat_template(checkpoint: str | Path) -> bool:
    """Whether a checkpoint ships a chat template (tokenizer_config.json's ``chat_template``,
    chat_template.jinja / .json, or a GGUF's ``tokenizer.chat_template``)."""
    import json

    path = Path(checkpoint)
    if path.is_file() and path.suffix == ".gguf":
        from medgemma_core.checkpoints.gguf_index import GGUFIndex

        return bool(GGUFIndex(path).metadata.get("tokenizer.chat_template"))
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    config = path / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


class ChatService:
    """Event handlers over one model :class:`~medgemma_demo.host.Loader`.

    ``max_upload_mb``: largest upload (a zip may unpack to 4x this). One sample per file goes
    into a question (the first question of a QA file, the first series of a folder).
    ``checkpoint``: what was loaded (None: the embedded default, a base model);
    ``prompt_mode``: ``auto`` (base for the default and checkpoints without a chat template),
    ``chat`` or ``base``; ``max_batch`` / ``window_s``: the batcher's settings; ``command``:
    how the user started the demo (named in hints).
    """

    def __init__(self, loader: Loader[ChatModel], *, max_upload_mb: int = 1024,
                 checkpoint: str | None = None, prompt_mode: str = "auto", max_batch: int = 8,
                 window_s: float = 0.25, command: str = "medgemma-demo",
                 queue_size: int | None = None):
        if prompt_mode not in ("auto", CHAT, BASE):
            raise ValueError(f"prompt_mode {prompt_mode!r}: choose auto, chat or base")
        self.loader = loader
        self.max_bytes = int(max_upload_mb * MB)
        self.checkpoint = checkpoint
        self.prompt_mode = prompt_mode
        self.command = command
        self.queue_size = queue_size
        self._rows: dict[str, Row] = {}
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._backend: Any = None
        self.batcher = Batcher(self._get_backend, max_batch=max_batch, window_s=window_s)

    # ---- model, mode, backend ----------------------------------------------------------------
    def _model(self) -> ChatModel:
        model = self.loader.wait(LOAD_WAIT_S)
        if model is None:
            raise gr.Error(f"the model is not available: {self.loader.error or 'still loading'}",
                           print_exception=False)
        return model

    @property
    def mode(self) -> str | None:
        """``chat`` or ``base`` (None while the model loads and the mode is auto)."""
        if self.prompt_mode != "auto":
            return self.prompt_mode
        model = self.loader.value
        if model is None:
            return BASE if self.checkpoint is None else None
        if not text_engine(model):
            return CHAT  # stand-ins and image-text models use their template
        if self.checkpoint is None:
            return BASE
        return CHAT if has_chat_template(self.checkpoint) else BASE

    def repetition_defaults(self) -> tuple[float, int]:
        return REPETITION[self.mode or CHAT]

    def _get_backend(self) -> Any:
        if self._backend is None:
            model = self._model()
            batchable = hasattr(model, "engine") and hasattr(model, "chat_prompts")
            self._backend = CoreBackend(model, self.mode or CHAT,
                                        max_batch=self.batcher.max_batch) if batchable \
                else SerialBackend(model)
        return self._backend

    # ---- status --------------------------------------------------------------------------
    def status(self) -> str:
        """Markdown: what the model is doing now, the prompt mode, the batching settings."""
        ld = self.loader
        if ld.phase == "failed":
            return (f"**Model failed to load:** {ld.error}  \nRestart with a working "
                    f"`{self.command} --checkpoint ...` (a MedGemma / Gemma 3 folder or a "
                    ".gguf file).")
        if ld.phase != "ready" or ld.value is None:
            what = "compiling the first generation" if ld.phase == "compiling" else \
                "loading the model"
            return (f"**Please wait:** {what} ({ld.elapsed:.0f} s)... You can type and upload "
                    "now; answers start when it is ready.")
        model = ld.value
        kind = "image-text model" if model.is_multimodal else "text-only model"
        mode = self.mode
        if mode == BASE:
            how = ("**base-model mode**: a completion prompt (a short \"Question: ... "
                   "Answer:\" frame), the answer ends at a blank line; repetition control on")
        else:
            how = "**chat mode**: the checkpoint's chat template"
        b = self.batcher
        return (f"**Ready:** {model.name} ({kind}, loaded in {ld.ready_after:.0f} s). "
                f"Prompt: {how}.  \nServing: up to {b.max_batch} questions decoded together "
                f"(batch window {b.window_s * 1000:.0f} ms, starting {b.gap_s * 1000:.0f} ms "
                "after the last question came"
                + (f", queue of at most {self.queue_size} requests" if self.queue_size else "")
                + f"); {b.waiting} waiting, {b.running} in the running batch.")

    # ---- stop ------------------------------------------------------------------------------
    def request_stop(self, request: gr.Request) -> None:
        """Stop the running answer of this browser session (the other users' go on)."""
        with self._lock:
            row = self._rows.get(_session(request))
        if row is not None:
            row.cancel()

    # ---- uploads --------------------------------------------------------------------------
    def load_files(self, files: Sequence[str] | str | None, modality: str | None = None,
                   options: str | None = None, surface: str = "page") -> LoadedUpload:
        """Files -> samples; ``modality`` ``None`` or ``"auto"`` lets the plugins detect it;
        ``options``: reading options, ``key=value`` per line."""
        if not files:
            return LoadedUpload()
        paths = [files] if isinstance(files, str) else list(files)
        modality = None if not modality or modality == AUTO else modality
        try:
            return load_uploads(paths, max_bytes=self.max_bytes, max_samples=1,
                                modality=modality, options=parse_options(options),
                                surface=surface)
        except UploadError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    def upload(self, files: Sequence[str] | None, modality: str | None = None,
               options: str | None = None) -> tuple[list, str, list]:
        """Files -> (gallery items, status markdown, pending samples). A bad file gives an
        empty gallery, the reason under the upload box and a warning toast."""
        try:
            loaded = self.load_files(files, modality, options)
        except gr.Error as exc:
            gr.Warning(exc.message)
            return [], f"**Could not read the upload:** {exc.message}", []
        lines = list(loaded.summary)
        model = self.loader.value
        if loaded.num_images and model is not None and not model.is_multimodal:
            lines.append(text_only_note(model.name, self.command))
        return loaded.gallery, "  \n".join(lines), loaded.samples

    # ---- chat -----------------------------------------------------------------------------
    def sampling(self, temperature: float, repetition_penalty: float | None = None,
                 no_repeat_ngram_size: float | None = None) -> Any:
        from medgemma_core import Sampling

        default_p, default_n = self.repetition_defaults()
        p = default_p if repetition_penalty is None else float(repetition_penalty)
        n = default_n if no_repeat_ngram_size is None else int(no_repeat_ngram_size)
        if p == 1.0 and n == 0:
            return Sampling(temperature=float(temperature))
        # the answer's own repeats only: a question's words may be quoted in its answer
        return Sampling(temperature=float(temperature), repetition_penalty=p,
                        no_repeat_ngram_size=n, penalize_prompt=False)

    def request(self, system: str, history: Sequence[dict], turn: Any, max_new_tokens: int,
                sampling: Any) -> Request:
        """The batcher's request for one question (chat messages, or the completion text)."""
        if self.mode == BASE:
            return Request(base_prompt(system or "", history, turn), max_new_tokens, sampling,
                           BASE_STOPS)
        return Request(messages(system or "", history, turn), max_new_tokens, sampling)

    def submit(self, text: str, display: list[dict], pending: list, request: gr.Request
               ) -> tuple[str, list[dict], list[dict], str, list, Any, list, str]:
        """Move the typed question and the attached files into the chat (fast; the answer
        streams in ``respond``). Returns (text box, chat, chat state, question, the samples
        sent, file box, gallery, upload status): the upload box and the gallery empty, since
        the files now belong to this question."""
        session = _session(request)
        text = (text or "").strip()
        if not text and not pending:
            raise gr.Error("type a question (or attach a file) first", print_exception=False)
        with self._lock:
            if session in self._busy:
                raise gr.Error("an answer is still coming; wait for it or press Stop",
                               print_exception=False)
            self._busy.add(session)
        shown = text or "(attached file)"
        n_images = sum(len(s.images) for s in pending)
        status = ""
        if pending:
            kinds = ", ".join(sorted({s.modality for s in pending}))
            shown += f"\n\n[attached] {kinds}: {n_images} image(s)"
            status = (f"Sent with your question: {kinds}, {n_images} image(s). Upload again "
                      "to attach files to the next question.")
        display = [*display, {"role": "user", "content": shown}]
        return "", display, display, text, list(pending), None, [], status

    def respond(self, question: str, display: list[dict], history: list[dict], sent: list,
                system: str, max_new_tokens: float, temperature: float,
                repetition_penalty: float | None = None, no_repeat_ngram_size: float | None = None,
                request: gr.Request | None = None
                ) -> Iterator[tuple[list[dict], list[dict], list[dict]]]:
        """Stream the answer: yields (chat, chat state, history)."""
        try:
            yield from self._respond(question, display, history, sent, system, max_new_tokens,
                                     temperature, repetition_penalty, no_repeat_ngram_size,
                                     request)
        finally:
            with self._lock:
                self._busy.discard(_session(request))
                self._rows.pop(_session(request), None)

    def _respond(self, question, display, history, sent, system, max_new_tokens, temperature,
                 repetition_penalty, no_repeat_ngram_size, request):
        max_new_tokens = min(max(int(max_new_tokens), 1), MAX_NEW_TOKENS)
        display = [*display, {"role": "assistant", "content": ""}]
        if not self.loader.done:
            display[-1]["content"] = "(waiting for the model to load...)"
            yield display, display, history
        model = self._model()
        turn = user_turn(question, sent, multimodal=model.is_multimodal)
        note = ""
        if turn.dropped_images:
            note = (f"\n\n_({turn.dropped_images} image(s) not sent: {model.name} is "
                    "text-only.)_")
        if not turn.content:
            display[-1]["content"] = note.strip() or "(nothing to send)"
            yield display, display, history
            return
        sampling = self.sampling(temperature, repetition_penalty, no_repeat_ngram_size)
        row = self.batcher.submit(self.request(system, history, turn, max_new_tokens, sampling))
        with self._lock:
            self._rows[_session(request)] = row
        answer = ""
        start = time.perf_counter()
        try:
            for piece in row.pieces(timeout=LOAD_WAIT_S):
                answer += piece
                display[-1]["content"] = answer + "▌"
                yield display, display, history
        except RowError as exc:  # e.g. an image sent to a text-only model, prompt too long
            display[-1]["content"] = f"⚠ {exc}"
            yield display, display, history
            return
        finally:
            row.cancel()  # the page went away mid-answer: free the row
        answer = answer.strip() if self.mode == BASE else answer
        tail = ""
        if row.finish == "cancelled":
            tail = "\n\n_(stopped)_"
        elif row.finish == LENGTH:
            tail = (f"\n\n_(cut at {max_new_tokens} tokens: raise Max new tokens under "
                    "Settings for a longer answer)_")
        display[-1]["content"] = (answer or "(no answer)") + note + tail
        history = [*history, {"role": "user", "content": turn.content},
                   {"role": "assistant", "content": answer}]
        log.info("answer: %d turn(s), %d image(s), %d chars in %.1f s (batch of %d, %s)",
                 len(history) // 2, sum(len(s.images) for s in sent), len(answer),
                 time.perf_counter() - start, row.batch_size, row.finish)
        yield display, display, history

    def api_chat(self, message: str, file: str | None = None, system: str = "",
                 max_new_tokens: float = 128, temperature: float = 0.0, modality: str = AUTO,
                 options: str = "", repetition_penalty: float | None = None,
                 no_repeat_ngram_size: float | None = None) -> str:
        """One question (and optionally one file, read as ``modality`` with the reading
        ``options``) -> the whole answer. Every argument but the message is optional."""
        loaded = self.load_files(file, modality, options, surface="api")
        max_new_tokens = min(max(int(max_new_tokens or 128), 1), MAX_NEW_TOKENS)
        model = self._model()
        turn = user_turn(message or "", loaded.samples, multimodal=model.is_multimodal)
        if turn.dropped_images:
            raise gr.Error(f"{model.name} is text-only and cannot read the {turn.dropped_images} "
                           f"image(s) of this file; start the demo with `{self.command} "
                           "--checkpoint` pointing at an image-text MedGemma (e.g. "
                           "medgemma-4b-it)", print_exception=False)
        if not turn.content:
            raise gr.Error("send a message (or a file)", print_exception=False)
        start = time.perf_counter()
        sampling = self.sampling(temperature or 0.0, repetition_penalty, no_repeat_ngram_size)
        row = self.batcher.submit(self.request(system or "", [], turn, max_new_tokens, sampling))
        try:
            answer = row.text(timeout=LOAD_WAIT_S)
        except RowError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        finally:
            row.cancel()
        answer = answer.strip() if self.mode == BASE else answer
        log.info("api answer: %d image(s), %d chars in %.1f s (batch of %d)", loaded.num_images,
                 len(answer), time.perf_counter() - start, row.batch_size)
        return answer


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"
