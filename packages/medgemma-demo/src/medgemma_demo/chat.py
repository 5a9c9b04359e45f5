"""The chat behind the page and the ``/chat`` endpoint, independent of the layout.

:class:`ChatService` holds the model loader, the upload limit and one stop flag per browser
session. Its methods are the event handlers :mod:`medgemma_demo.app` wires up: ``upload``
(files -> gallery), ``respond`` (a generator that streams the answer into the chat) and
``api_chat`` (message + optional file -> the whole answer). Errors reach the page as
``gradio.Error`` with one line; logs hold counts and timings only, never text or file names.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import gradio as gr

from .host import ChatModel, Loader, one_line
from .prompting import messages, user_turn
from .uploads import MB, LoadedUpload, UploadError, load_uploads

log = logging.getLogger("medgemma_demo")

#: Longest a request waits for the model to finish loading, seconds.
LOAD_WAIT_S = 1800.0
#: Upper bound of the max-new-tokens setting.
MAX_NEW_TOKENS = 2048
#: The "Read as" choice that lets the data plugins detect the modality.
AUTO = "auto"


def text_only_note(name: str) -> str:
    return (f"**{name}** is a text-only model: uploads are shown in the gallery (what an "
            "image-text MedGemma would see) but their images are not sent. Start the demo with "
            "`medgemma-demo --checkpoint path/to/medgemma-4b-it` for image questions.")


class ChatService:
    """Event handlers over one model :class:`~medgemma_demo.host.Loader`.

    ``max_upload_mb``: largest upload (a zip may unpack to 4x this). One sample per file goes
    into a question (the first question of a QA file, the first series of a folder).
    """

    def __init__(self, loader: Loader[ChatModel], *, max_upload_mb: int = 1024):
        self.loader = loader
        self.max_bytes = int(max_upload_mb * MB)
        self._stops: dict[str, threading.Event] = {}
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    # ---- status --------------------------------------------------------------------------
    def status(self) -> str:
        """Markdown: what the model is doing now."""
        ld = self.loader
        if ld.phase == "failed":
            return (f"**Model failed to load:** {ld.error}  \nRestart with a working "
                    "`--checkpoint` (a MedGemma / Gemma 3 folder or a .gguf file).")
        if ld.phase != "ready" or ld.value is None:
            what = "compiling the first generation" if ld.phase == "compiling" else \
                "loading the model"
            return (f"**Please wait:** {what} ({ld.elapsed:.0f} s)... You can type and upload now; answers "
                    "start when it is ready.")
        model = ld.value
        kind = "image-text model" if model.is_multimodal else "text-only model"
        return f"**Ready:** {model.name} ({kind}, loaded in {ld.ready_after:.0f} s)."

    def _model(self) -> ChatModel:
        model = self.loader.wait(LOAD_WAIT_S)
        if model is None:
            raise gr.Error(f"the model is not available: {self.loader.error or 'still loading'}",
                           print_exception=False)
        return model

    # ---- stop flags ------------------------------------------------------------------------
    def _flag(self, session: str) -> threading.Event:
        with self._lock:
            if len(self._stops) > 10000:  # forget old sessions
                self._stops.clear()
            return self._stops.setdefault(session, threading.Event())

    def request_stop(self, request: gr.Request) -> None:
        """Ask the running answer of this browser session to stop."""
        self._flag(_session(request)).set()

    # ---- uploads --------------------------------------------------------------------------
    def load_files(self, files: Sequence[str] | str | None,
                   modality: str | None = None) -> LoadedUpload:
        """Files -> samples; ``modality`` ``None`` or ``"auto"`` lets the plugins detect it."""
        if not files:
            return LoadedUpload()
        paths = [files] if isinstance(files, str) else list(files)
        modality = None if not modality or modality == AUTO else modality
        try:
            return load_uploads(paths, max_bytes=self.max_bytes, max_samples=1,
                                modality=modality)
        except UploadError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    def upload(self, files: Sequence[str] | None,
               modality: str | None = None) -> tuple[list, str, list]:
        """Files -> (gallery items, status markdown, pending samples). A bad file gives an
        empty gallery, the reason under the upload box and a warning toast."""
        try:
            loaded = self.load_files(files, modality)
        except gr.Error as exc:
            gr.Warning(exc.message)
            return [], f"**Could not read the upload:** {exc.message}", []
        lines = list(loaded.summary)
        model = self.loader.value
        if loaded.num_images and model is not None and not model.is_multimodal:
            lines.append(text_only_note(model.name))
        return loaded.gallery, "  \n".join(lines), loaded.samples

    # ---- chat -----------------------------------------------------------------------------
    def submit(self, text: str, display: list[dict], pending: list,
               request: gr.Request) -> tuple[str, list[dict], list[dict], str]:
        """Move the typed question into the chat (fast; the answer streams in ``respond``).

        Returns (cleared text box, chat, chat state, the question for ``respond``)."""
        session = _session(request)
        text = (text or "").strip()
        if not text and not pending:
            raise gr.Error("type a question (or attach a file) first", print_exception=False)
        with self._lock:
            if session in self._busy:
                raise gr.Error("an answer is still coming; wait for it or press Stop",
                               print_exception=False)
            self._busy.add(session)
        self._flag(session).clear()
        shown = text or "(attached file)"
        n_images = sum(len(s.images) for s in pending)
        if pending:
            kinds = ", ".join(sorted({s.modality for s in pending}))
            shown += f"\n\n[attached] {kinds}: {n_images} image(s)"
        display = [*display, {"role": "user", "content": shown}]
        return "", display, display, text

    def respond(self, question: str, display: list[dict], history: list[dict], pending: list,
                system: str, max_new_tokens: float, temperature: float,
                request: gr.Request) -> Iterator[tuple[list[dict], list[dict], list[dict], list, Any]]:
        """Stream the answer: yields (chat, chat state, history, pending samples, file box)."""
        try:
            yield from self._respond(question, display, history, pending, system,
                                     max_new_tokens, temperature, request)
        finally:
            with self._lock:
                self._busy.discard(_session(request))

    def _respond(self, question: str, display: list[dict], history: list[dict], pending: list,
                 system: str, max_new_tokens: float, temperature: float,
                 request: gr.Request) -> Iterator[tuple[list[dict], list[dict], list[dict], list, Any]]:
        stop = self._flag(_session(request))
        max_new_tokens = min(max(int(max_new_tokens), 1), MAX_NEW_TOKENS)
        display = [*display, {"role": "assistant", "content": ""}]
        if not self.loader.done:
            display[-1]["content"] = "(waiting for the model to load...)"
            yield display, display, history, pending, gr.update()
        model = self._model()
        turn = user_turn(question, pending, multimodal=model.is_multimodal)
        note = ""
        if turn.dropped_images:
            note = (f"\n\n_({turn.dropped_images} image(s) not sent: {model.name} is "
                    "text-only.)_")
        if not turn.content:
            display[-1]["content"] = note.strip() or "(nothing to send)"
            yield display, display, history, [], None
            return
        msgs = messages(system or "", history, turn)
        answer = ""
        start = time.perf_counter()
        from medgemma_core import Sampling

        pieces = model.chat_stream(msgs, max_new_tokens=int(max_new_tokens),
                                   sampling=Sampling(temperature=float(temperature)))
        stopped = False
        try:
            for piece in pieces:
                answer += piece
                display[-1]["content"] = answer + "▌"
                yield display, display, history, pending, gr.update()
                if stop.is_set():
                    stopped = True
                    break
        except ValueError as exc:  # e.g. an image sent to a text-only model, prompt too long
            display[-1]["content"] = f"⚠ {one_line(exc)}"
            yield display, display, history, pending, gr.update()
            return
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        stop.clear()
        display[-1]["content"] = (answer or "(no answer)") + note + \
            ("\n\n_(stopped)_" if stopped else "")
        history = [*history, {"role": "user", "content": turn.content},
                   {"role": "assistant", "content": answer}]
        log.info("answer: %d turn(s), %d image(s), %d chars in %.1f s%s",
                 len(history) // 2, sum(len(s.images) for s in pending), len(answer),
                 time.perf_counter() - start, " (stopped)" if stopped else "")
        yield display, display, history, [], None

    def api_chat(self, message: str, file: str | None, system: str = "",
                 max_new_tokens: float = 128, temperature: float = 0.0,
                 modality: str = AUTO) -> str:
        """One question (and optionally one file, read as ``modality``) -> the whole answer."""
        loaded = self.load_files(file, modality)
        max_new_tokens = min(max(int(max_new_tokens), 1), MAX_NEW_TOKENS)
        model = self._model()
        turn = user_turn(message or "", loaded.samples, multimodal=model.is_multimodal)
        if turn.dropped_images:
            raise gr.Error(f"{model.name} is text-only and cannot read the {turn.dropped_images} "
                           "image(s) of this file; start the demo with --checkpoint pointing "
                           "at an image-text MedGemma (e.g. medgemma-4b-it)",
                           print_exception=False)
        if not turn.content:
            raise gr.Error("send a message (or a file)", print_exception=False)
        start = time.perf_counter()
        from medgemma_core import Sampling

        try:
            answer = "".join(model.chat_stream(messages(system or "", [], turn),
                                               max_new_tokens=int(max_new_tokens),
                                               sampling=Sampling(temperature=float(temperature))))
        except ValueError as exc:
            raise gr.Error(one_line(exc), print_exception=False) from None
        log.info("api answer: %d image(s), %d chars in %.1f s", loaded.num_images, len(answer),
                 time.perf_counter() - start)
        return answer


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"
