"""The MedGemma image-text model: SigLIP vision tower -> projector -> soft tokens in the decoder.

::

    pixels [N, S, S, 3] --VisionTower--> [N, G*G, Dv] --Projector--> soft tokens [N, M, D]
    tokens [B, T] --embed (x sqrt(D))--> [B, T, D], the i-th run of M image tokens replaced by
    image i's soft tokens --Gemma3 (image blocks bidirectional)--> logits [B, T, V]

The projector average-pools the row-major ``G x G`` patch grid to ``sqrt(M) x sqrt(M)``
(kernel ``G / sqrt(M)``: 4 for MedGemma's 64 -> 16), applies RMSNorm(1 + w) and multiplies by
``W [Dv, D]`` (REFERENCE.md section 3). Every size comes from :class:`MultimodalConfig`, read from
the checkpoint's ``config.json``. Image blocks are derived from the token ids: each maximal run
of ``image_token_id`` tokens is one block (``image_id`` 1, 2, ... per row; 0 for text), inside
which attention is bidirectional (in local layers still limited to the window).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medsiglip import SiglipVisionConfig, VisionTower
from medsiglip.lora import adapt
from medsiglip.sharding import param

from .config import Gemma3Config
from .layers import RMSNorm
from .transformer import Gemma3

__all__ = ["Gemma3Multimodal", "MultimodalConfig", "Projector", "check_image_count",
           "image_blocks", "scatter_soft_tokens"]


@dataclasses.dataclass(frozen=True)
class MultimodalConfig:
    """A Gemma 3 image-text model (Gemma3ForConditionalGeneration): decoder, vision tower,
    ``mm_tokens_per_image`` soft tokens per image, and the image token ids."""

    text: Gemma3Config
    vision: SiglipVisionConfig
    mm_tokens_per_image: int = 256
    image_token_id: int = 262_144
    boi_token_id: int = 255_999
    eoi_token_id: int = 256_000

    def __post_init__(self) -> None:
        side = math.isqrt(self.mm_tokens_per_image)
        if self.mm_tokens_per_image < 1 or side * side != self.mm_tokens_per_image:
            raise ValueError(f"mm_tokens_per_image={self.mm_tokens_per_image} is not a square "
                             f"number; the projector pools the patch grid to a square")
        if self.vision.grid_size % side:
            raise ValueError(
                f"the {self.vision.grid_size}x{self.vision.grid_size} patch grid (image_size "
                f"{self.vision.image_size} / patch {self.vision.patch_size}) cannot be pooled to "
                f"{side}x{side}; mm_tokens_per_image must divide it evenly")
        if self.vision.use_head:  # Gemma 3 uses the patch tokens, never the MAP head
            object.__setattr__(self, "vision", self.vision.replace(use_head=False))

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    @property
    def pool(self) -> int:
        """Average-pooling kernel and stride over the patch grid (4 for MedGemma)."""
        return self.vision.grid_size // self.tokens_per_side

    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any]) -> MultimodalConfig:
        """Parse a Gemma3ForConditionalGeneration ``config.json`` (both spellings of the ids)."""
        if "vision_config" not in cfg:
            raise ValueError("config.json has no vision_config: not an image-text (Gemma3ForConditional"
                             "Generation) checkpoint; load it as a text model")

        def pick(*keys: str, default: int) -> int:
            for k in keys:
                if cfg.get(k) is not None:
                    try:
                        return int(cfg[k])
                    except (TypeError, ValueError, OverflowError):
                        raise ValueError(f"config.json: {k} is {cfg[k]!r:.40}, not a token id or "
                                         "count") from None
            return default

        return cls(
            text=Gemma3Config.from_hf_dict(cfg.get("text_config") or {}),
            vision=SiglipVisionConfig.from_hf_dict(cfg["vision_config"] or {}),
            mm_tokens_per_image=pick("mm_tokens_per_image", default=256),
            image_token_id=pick("image_token_index", "image_token_id", default=262_144),
            boi_token_id=pick("boi_token_index", "boi_token_id", default=255_999),
            eoi_token_id=pick("eoi_token_index", "eoi_token_id", default=256_000))

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` for Gemma3ForConditionalGeneration (transformers 5 spelling)."""
        text = self.text.to_hf_dict()
        text.pop("architectures", None)
        vision = dict(self.vision.to_hf_dict(), model_type="siglip_vision_model")
        return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                "text_config": text, "vision_config": vision,
                "mm_tokens_per_image": self.mm_tokens_per_image,
                "image_token_index": self.image_token_id, "boi_token_index": self.boi_token_id,
                "eoi_token_index": self.eoi_token_id, "tie_word_embeddings": True}

    @classmethod
    def medgemma_4b(cls) -> MultimodalConfig:
        """google/medgemma-4b-it: Gemma 3 4B + SigLIP So400m/14 at 896 (64x64 -> 256 tokens)."""
        return cls(Gemma3Config.gemma3_4b(), SiglipVisionConfig.so400m_patch14_896())

    @classmethod
    def medgemma_27b(cls) -> MultimodalConfig:
        """google/medgemma-27b-it (image-text)."""
        return cls(Gemma3Config.gemma3_27b(), SiglipVisionConfig.so400m_patch14_896())

    @classmethod
    def tiny(cls, **text_overrides: Any) -> MultimodalConfig:
        """Unit-test sizes: 32 px images of 4x4 patches pooled 2x2 -> 4 soft tokens."""
        return cls(Gemma3Config.tiny(vocab_size=262_208, **text_overrides),
                   SiglipVisionConfig.tiny(image_size=32, use_head=False), mm_tokens_per_image=4)


class Projector(nnx.Module):
    """Patch tokens ``[N, G*G, Dv]`` -> soft tokens ``[N, M, D]``: 4x4 (``pool``) average pool of
    the row-major grid, RMSNorm(1 + w) over Dv, then ``x @ weight`` with ``weight [Dv, D]``
    (plus its LoRA adapter, if any)."""

    lora_targets = {"weight": 1}

    def __init__(self, cfg: MultimodalConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        dv, d = cfg.vision.hidden_size, cfg.text.hidden_size
        self.norm = RMSNorm(dv, eps=cfg.vision.layer_norm_eps, dtype=dtype, name="vision_embed")
        self.weight = param(nnx.initializers.normal(dv ** -0.5)(rngs.params(), (dv, d), dtype),
                            ("vision_embed", "embed"))
        self.lora = nnx.data(None)
        self.grid = cfg.vision.grid_size
        self.side = cfg.tokens_per_side

    def __call__(self, tokens: jax.Array) -> jax.Array:
        n, p, dv = tokens.shape
        if p != self.grid * self.grid:
            raise ValueError(f"expected {self.grid * self.grid} patch tokens, got {p}")
        k = self.grid // self.side
        x = tokens.astype(jnp.float32).reshape(n, self.side, k, self.side, k, dv)
        x = x.mean(axis=(2, 4)).astype(tokens.dtype).reshape(n, self.side * self.side, dv)
        w = self.weight[...]  # f32 accumulation without an f32 copy of w (XLA on CPU)
        x = self.norm(x).astype(w.dtype)
        out = jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(tokens.dtype)
        return adapt(self, "weight", x, out)


def image_blocks(tokens: jax.Array, image_token_id: int) -> jax.Array:
    """``[B, T]`` ids -> ``[B, T]`` int32: k > 0 for the k-th run of image tokens in the row,
    0 for text (``<start_of_image>`` / ``<end_of_image>`` are text)."""
    tokens = jnp.asarray(tokens)
    is_img = tokens == image_token_id
    prev = jnp.pad(is_img, ((0, 0), (1, 0)))[:, :-1]
    starts = is_img & ~prev
    return jnp.where(is_img, jnp.cumsum(starts, axis=1), 0).astype(jnp.int32)


def scatter_soft_tokens(embeddings: jax.Array, tokens: jax.Array, soft: jax.Array,
                        image_token_id: int) -> jax.Array:
    """Replace the image-token positions of ``embeddings [B, T, D]`` by ``soft [N, M, D]`` in
    reading order (row by row, left to right), as transformers' ``masked_scatter`` does."""
    mask = (jnp.asarray(tokens) == image_token_id).reshape(-1)
    flat_soft = soft.reshape(-1, soft.shape[-1]).astype(embeddings.dtype)
    index = jnp.clip(jnp.cumsum(mask) - 1, 0, max(flat_soft.shape[0] - 1, 0))
    flat = embeddings.reshape(-1, embeddings.shape[-1])
    out = jnp.where(mask[:, None], flat_soft[index], flat)
    return out.reshape(embeddings.shape)


class Gemma3Multimodal(nnx.Module):
    """The image-text model: ``vision`` (medsiglip VisionTower), ``projector``, ``decoder``."""

    def __init__(self, cfg: MultimodalConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.vision = VisionTower(cfg.vision, dtype=dtype, rngs=rngs)
        self.projector = Projector(cfg, dtype=dtype, rngs=rngs)
        self.decoder = Gemma3(cfg.text, dtype=dtype, rngs=rngs)

    def encode_images(self, pixels: jax.Array) -> jax.Array:
        """Normalized images ``[N, S, S, 3]`` (NHWC, [-1, 1]) -> soft tokens ``[N, M, D]``."""
        return self.projector(self.vision(jnp.asarray(pixels, self.dtype)))

    def embed(self, tokens: jax.Array, soft: jax.Array | None = None) -> jax.Array:
        """Token embeddings ``[B, T, D]`` (scaled) with the soft tokens ``[N, M, D]`` in place."""
        tokens = jnp.asarray(tokens)
        img = tokens == self.config.image_token_id
        emb = self.decoder.embed(jnp.where(img, 0, tokens))  # the image id may be out of vocab
        if soft is None:
            return emb
        return scatter_soft_tokens(emb, tokens, soft, self.config.image_token_id)

    def __call__(self, tokens: jax.Array, pixels: jax.Array | None = None, *,
                 start: jax.Array | None = None, logits_at: str = "all"):
        """Whole sequences ``[B, T]`` (+ their images ``[N, S, S, 3]`` in reading order) ->
        logits ``[B, T, V]`` (or as ``logits_at`` says, see :class:`Gemma3`)."""
        tokens = jnp.asarray(tokens)
        check_image_count(np.asarray(tokens), 0 if pixels is None else len(pixels), self.config)
        soft = None if pixels is None else self.encode_images(pixels)
        logits, _ = self.decoder(tokens, embeddings=self.embed(tokens, soft), start=start,
                                 image_id=image_blocks(tokens, self.config.image_token_id),
                                 logits_at=logits_at)
        return logits


def check_image_count(tokens: np.ndarray, n_images: int, cfg: MultimodalConfig) -> None:
    """A clear error when the image tokens in ``tokens`` do not match ``n_images`` images."""
    found = int(np.sum(np.asarray(tokens) == cfg.image_token_id))
    if found != n_images * cfg.mm_tokens_per_image:
        raise ValueError(
            f"the prompt holds {found} image tokens but {n_images} image(s) x "
            f"{cfg.mm_tokens_per_image} soft tokens were given; build prompts with "
            f"medgemma_core.processor.Processor, which expands each image")
