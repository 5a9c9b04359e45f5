"""Prompts for the :class:`~medgemma_core.generate.Engine`: token ids, and for conversations with
images the decoder's input embeddings and image blocks.

::

    chat messages --Processor--> ids [T] + pixels [N, S, S, 3]
        --vision tower + projector (PromptEncoder.encode_images)--> soft tokens [N, M, D]
        --embed, soft tokens in place of the image tokens--> embeddings [B, T, D], image_id [B, T]

Rows are right-aligned to the longest (shorter rows left-padded, as the engine pads them), and
the images of every conversation of a batch are encoded together, ``image_batch`` per call
(one compiled shape).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .multimodal import Gemma3Multimodal, MultimodalConfig, check_image_count, image_blocks
from .processor import Processor

__all__ = ["PromptEncoder", "Prompts"]

Messages = Sequence[Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Prompts:
    """A batch for the engine: ``ids`` (one list per row, unpadded) and, for image-text prompts,
    ``embeddings [B, T, D]`` and ``image_id [B, T]`` with ``T`` the longest row (shorter rows
    left-padded); None for text-only prompts, which the engine embeds itself."""

    ids: list[list[int]]
    embeddings: jax.Array | None = None
    image_id: jax.Array | None = None


class PromptEncoder:
    """Chat messages with text and image items -> :class:`Prompts` for the image-text model's
    decoder: the processor's ids and pixels, the images through the vision tower and projector
    (``image_batch`` per call, the last call padded), the soft tokens in the embeddings."""

    def __init__(self, model: Gemma3Multimodal, processor: Processor, *, image_batch: int = 4):
        if processor.image_token_id != model.config.image_token_id:
            raise ValueError(
                f"the processor's image token is id {processor.image_token_id} but the model's "
                f"config.json says image_token_index={model.config.image_token_id}; use the "
                f"tokenizer files of this checkpoint")
        self.config: MultimodalConfig = model.config
        self.processor = processor
        self.image_batch = max(1, int(image_batch))
        self._graphdef, self._state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=(0,))
    def _encode(self, state, pixels):
        return nnx.merge(self._graphdef, state).encode_images(pixels)

    @functools.partial(jax.jit, static_argnums=(0,))
    def _embed(self, state, tokens, soft):
        return nnx.merge(self._graphdef, state).embed(tokens, soft)

    def encode_images(self, pixels: np.ndarray) -> jax.Array:
        """``[N, S, S, 3]`` -> soft tokens ``[N, M, D]``, ``image_batch`` images per call (the last
        batch padded, so every call has the same shape)."""
        pixels = np.asarray(pixels, np.float32)
        n, b = len(pixels), min(self.image_batch, max(len(pixels), 1))
        out = []
        for i in range(0, n, b):
            chunk = pixels[i:i + b]
            if len(chunk) < b:
                chunk = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]),
                                                        chunk.dtype)])
            out.append(self._encode(self._state, chunk)[:min(b, n - i)])
        return jnp.concatenate(out) if out else jnp.zeros(
            (0, self.config.mm_tokens_per_image, self.config.text.hidden_size))

    def __call__(self, conversations: Sequence[Messages], *, pad_id: int = 0) -> Prompts:
        """Conversations -> ids, embeddings and image blocks, one row each, right-aligned (left
        padding with ``pad_id``). The images of all conversations are encoded together."""
        processed = [self.processor(messages) for messages in conversations]
        ids = [list(p.input_ids) for p in processed]
        counts = [len(p.pixel_values) for p in processed]
        for row, n in zip(ids, counts):
            check_image_count(np.asarray(row), n, self.config)
        t = max(len(row) for row in ids)
        tokens = np.full((len(ids), t), pad_id, np.int32)
        for r, row in enumerate(ids):
            tokens[r, t - len(row):] = row
        pixels = [p.pixel_values for p, n in zip(processed, counts) if n]
        soft = self.encode_images(np.concatenate(pixels)) if pixels else None
        emb = self._embed(self._state, jnp.asarray(tokens), soft)  # soft tokens in reading order
        return Prompts(ids, emb, image_blocks(tokens, self.config.image_token_id))
