"""Training forward passes and the next-token loss of :class:`~medgemma_core.Gemma3` (text) and
:class:`~medgemma_core.Gemma3Multimodal` (image-text), for ``jax.jit`` / ``jax.grad`` / ``nnx.grad``.

::

    batch = TrainBatch.from_collated(processor.collate(examples), slots=2)  # static shapes
    def loss_fn(model):
        loss_sum, n = next_token_loss(model, batch, compute_dtype=jnp.bfloat16, remat="dots")
        return loss_sum / n
    grads = nnx.grad(loss_fn)(model)   # f32 master weights get f32 gradients

Images sit in a fixed number ``N`` of slots per row (``pixels [B, N, S, S, 3]``, zeros in unused
slots, ``image_mask [B, N]``), so batches whose rows hold different numbers of images have one
shape and compile once. Slot ``k`` of row ``b`` fills the ``k``-th run of image tokens of row
``b``; the image-token counts are checked at the Python boundary
(:meth:`TrainBatch.from_collated`), never inside traced code.

The loss follows transformers' ``ForCausalLMLoss``: the logits at position ``t`` predict
``labels[t + 1]`` (labels are input-aligned, as :meth:`Processor.collate` builds them); labels
``< 0`` (``IGNORE_INDEX`` = -100: padding, image and ``<start_of_image>`` tokens, prompts) carry no
loss. It returns the summed loss and the number of counted tokens, so that gradient accumulation
and data parallelism weight every token alike. :func:`next_token_loss` projects ``chunk``
tokens at a time onto the 262,208-row vocabulary with a custom VJP (the backward pass
recomputes each chunk's logits; both of its products run in the compute dtype): it never holds
the ``[B, T, V]`` float32 logits that :func:`naive_next_token_loss` builds.

Precision: the parameters keep their dtype (e.g. float32 master weights); ``compute_dtype``
(e.g. ``jnp.bfloat16``) casts them inside the traced function, so the forward and backward run
in that dtype and the gradients land on the parameters in theirs. Without ``compute_dtype`` the
computation runs in the parameters' dtype (bf16 parameters: bf16 throughout).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .multimodal import Gemma3Multimodal, image_blocks
from .processor import IGNORE_INDEX, TrainingBatch
from .transformer import Gemma3

__all__ = ["DEFAULT_CHUNK", "IGNORE_INDEX", "TrainBatch", "forward_hidden", "in_compute_dtype",
           "naive_next_token_loss", "next_token_loss"]

#: Tokens projected onto the vocabulary at a time by :func:`next_token_loss`: 512 x 262,208
#: float32 logits are 537 MB.
DEFAULT_CHUNK = 512

Model = Gemma3 | Gemma3Multimodal


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """One training batch (a pytree of numpy or JAX arrays).

    ``tokens``, ``labels`` (input-aligned, ``IGNORE_INDEX`` where no loss), ``attention_mask``:
    int32 ``[B, T]`` (1 for real tokens; right or left padding). ``pixels``: float32
    ``[B, N, S, S, 3]`` normalized images in ``N`` slots per row (zeros in unused slots) and
    ``image_mask`` bool ``[B, N]``, or both None (text only)."""

    tokens: Any
    labels: Any
    attention_mask: Any
    pixels: Any = None
    image_mask: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, np.ndarray | jax.Array) or isinstance(self.tokens,
                                                                             jax.core.Tracer):
            return  # pytree plumbing (tracers, shape structs, shardings): nothing to check
        shape = tuple(self.tokens.shape)
        if len(shape) != 2:
            raise ValueError(f"tokens must be [B, T], got shape {list(shape)}")
        for name in ("labels", "attention_mask"):
            got = tuple(np.shape(getattr(self, name)))
            if got != shape:
                raise ValueError(f"{name} has shape {list(got)} but tokens {list(shape)}; "
                                 f"build the batch with TrainBatch.from_collated")
        if (self.pixels is None) != (self.image_mask is None):
            raise ValueError("pass pixels and image_mask together (or neither, for text only)")
        if self.pixels is not None:
            px, im = np.shape(self.pixels), np.shape(self.image_mask)
            if len(px) != 5 or px[:1] != shape[:1] or tuple(im) != tuple(px[:2]):
                raise ValueError(f"pixels must be [B, N, S, S, 3] and image_mask [B, N] with "
                                 f"B = {shape[0]}, got {list(px)} and {list(im)}")

    @property
    def slots(self) -> int:
        """Image slots per row (0 for a text-only batch)."""
        return 0 if self.pixels is None else int(self.pixels.shape[1])

    @classmethod
    def from_collated(cls, batch: TrainingBatch, *, slots: int | None = None,
                      mm_tokens_per_image: int | None = None,
                      image_token_id: int | None = None) -> TrainBatch:
        """:meth:`Processor.collate`'s batch (images concatenated over the rows, with
        ``images_per_row``) -> slots. ``slots``: images per row (default: the most any row
        holds; pass a fixed number so that every batch has one shape). Row ``r``'s image tokens
        must be ``images_per_row[r]`` runs of ``mm_tokens_per_image`` (default: inferred from
        the batch) tokens; image tokens are those of ``token_type_ids`` (or ``image_token_id``)."""
        tokens = np.asarray(batch.input_ids, np.int32)
        counts = [int(c) for c in batch.images_per_row]
        b, t = tokens.shape
        if len(counts) != b:
            raise ValueError(f"images_per_row has {len(counts)} entries for {b} rows")
        pixels = np.asarray(batch.pixel_values, np.float32)
        if len(pixels) != sum(counts):
            raise ValueError(f"{len(pixels)} images for images_per_row={counts} "
                             f"(sum {sum(counts)})")
        is_img = (tokens == image_token_id if image_token_id is not None
                  else np.asarray(batch.token_type_ids) == 1)
        m = _tokens_per_image(is_img, counts, mm_tokens_per_image)
        slots = max(counts, default=0) if slots is None else int(slots)
        for r, c in enumerate(counts):
            if c > slots:
                raise ValueError(f"row {r} holds {c} images but the batch has {slots} image "
                                 f"slots per row; raise slots= to at least {max(counts)}")
            runs = _runs(is_img[r])
            if len(runs) != c or any(n != m for n in runs):
                raise ValueError(
                    f"row {r} holds image-token runs of lengths {runs} for {c} image(s) of {m} "
                    f"tokens each; build rows with Processor, which expands each image")
        common = dict(tokens=tokens, labels=np.asarray(batch.labels, np.int32),
                      attention_mask=np.asarray(batch.attention_mask, np.int32))
        if slots == 0:
            return cls(**common)
        size = pixels.shape[1:] if len(pixels) else (0, 0, 3)
        slotted = np.zeros((b, slots, *size), np.float32)
        mask = np.zeros((b, slots), bool)
        first = np.cumsum([0] + counts)
        for r, c in enumerate(counts):
            slotted[r, :c] = pixels[first[r]:first[r] + c]
            mask[r, :c] = True
        return cls(**common, pixels=slotted, image_mask=mask)


def _runs(row: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
    return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()


def _tokens_per_image(is_img: np.ndarray, counts: list[int], given: int | None) -> int:
    found, n = int(is_img.sum()), sum(counts)
    if given is not None:
        return int(given)
    if n == 0:
        if found:
            raise ValueError(f"the batch holds {found} image tokens but no images")
        return 1
    if found % n:
        raise ValueError(f"the batch holds {found} image tokens for {n} images: not a whole "
                         f"number per image; pass mm_tokens_per_image=")
    return found // n


# ---- precision ------------------------------------------------------------------------------
def in_compute_dtype(model: Model, dtype: Any) -> Model:
    """``model`` computing in ``dtype``: a copy whose floating parameters are cast to ``dtype``
    (differentiably: gradients flow back to the originals in their dtype) and whose layers
    compute in it. ``model`` itself when ``dtype`` is None. Use inside the traced function."""
    if dtype is None:
        return model
    dtype = jnp.dtype(dtype)
    graphdef, state = nnx.split(model)

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    out = nnx.merge(graphdef, jax.tree.map(cast, state))
    for _, module in nnx.iter_modules(out):
        current = getattr(module, "dtype", None)
        if current is not None and jnp.issubdtype(current, jnp.floating):
            module.dtype = dtype  # Gemma3.dtype, nnx.Linear / nnx.LayerNorm compute dtypes
    return out


# ---- forward --------------------------------------------------------------------------------
def _decoder(model: Model) -> Gemma3:
    if isinstance(model, Gemma3Multimodal):
        return model.decoder
    if isinstance(model, Gemma3):
        return model
    raise TypeError(f"expected a Gemma3 or Gemma3Multimodal model, got {type(model).__name__}")


def _starts(attention_mask: jax.Array) -> jax.Array:
    """Each row's first real index (left padding; 0 for right-padded rows)."""
    return jnp.argmax(jnp.asarray(attention_mask) != 0, axis=1).astype(jnp.int32)


def _image_text_embeddings(model: Gemma3Multimodal, batch: TrainBatch, remat: str,
                           scan: bool) -> jax.Array:
    """Token embeddings ``[B, T, D]`` with slot ``k`` of row ``b``'s soft tokens in row ``b``'s
    ``k``-th image-token run (runs of ``M`` tokens, checked by ``from_collated``)."""
    tokens = jnp.asarray(batch.tokens)
    emb = model.embed(tokens)
    if batch.pixels is None:
        return emb
    cfg = model.config
    pixels = jnp.asarray(batch.pixels)
    b, n = pixels.shape[:2]
    m = cfg.mm_tokens_per_image
    images = pixels.reshape(b * n, *pixels.shape[2:]).astype(model.dtype)
    soft = model.projector(model.vision(images, remat=remat, scan=scan))  # [B * N, M, D]
    soft = soft.reshape(b, n, m, -1)
    soft = jnp.where(jnp.asarray(batch.image_mask)[:, :, None, None], soft, 0)
    soft = soft.reshape(b, n * m, -1).astype(emb.dtype)
    is_img = tokens == cfg.image_token_id
    ordinal = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, n * m - 1)  # j-th image token of the row
    picked = jnp.take_along_axis(soft, ordinal[:, :, None], axis=1)
    return jnp.where(is_img[:, :, None], picked, emb)


def forward_hidden(model: Model, batch: TrainBatch, *, compute_dtype: Any = None,
                   remat: str = "none", scan: bool = False) -> jax.Array:
    """The final (normed) hidden states ``[B, T, D]`` of a training batch; image blocks are
    bidirectional and the sliding window applies exactly as in inference. ``remat``: the policy
    of every decoder and vision block; ``scan``: run the decoder's layers (by period of 5 local
    + 1 global) and the vision blocks as ``lax.scan`` s, which compiles one period instead of
    every layer (:mod:`medsiglip.remat`)."""
    model = in_compute_dtype(model, compute_dtype)
    decoder = _decoder(model)
    tokens = jnp.asarray(batch.tokens)
    start = _starts(batch.attention_mask)
    if isinstance(model, Gemma3Multimodal):
        image_id = image_blocks(tokens, model.config.image_token_id)
        h, _ = decoder(tokens, embeddings=_image_text_embeddings(model, batch, remat, scan),
                       start=start, image_id=image_id, logits_at="none", remat=remat,
                       scan=scan)
        return h
    if batch.pixels is not None:
        raise ValueError("a text-only Gemma3 model got a batch with images; load the image-text "
                         "model (Gemma3Multimodal) or build the batch with slots=0")
    h, _ = decoder(tokens, start=start, logits_at="none", remat=remat, scan=scan)
    return h


# ---- loss -----------------------------------------------------------------------------------
def _shifted(h: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Hidden states ``[B*(T-1), D]`` at 0..T-2 and their targets ``labels[:, 1:]`` (< 0: none)."""
    labels = jnp.asarray(labels, jnp.int32)
    return h[:, :-1].reshape(-1, h.shape[-1]), labels[:, 1:].reshape(-1)


def _logits(h: jax.Array, table: jax.Array, softcap: float | None):
    """f32 logits ``[n, V]`` of ``h [n, D]`` (products in h's dtype, accumulated in float32)
    and the pre-cap ones (for the softcap's derivative)."""
    raw = jnp.einsum("nd,vd->nv", h, table.astype(h.dtype), preferred_element_type=jnp.float32)
    if softcap is None:
        return raw, raw
    return jnp.tanh(raw / softcap) * softcap, raw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_losses(h: jax.Array, table: jax.Array, targets: jax.Array,
                  softcap: float | None) -> jax.Array:
    """Summed cross entropy of ``h [n, D]`` against ``targets [n]`` (< 0: no loss) over the
    vocabulary ``table [V, D]``. Its backward pass recomputes the logits and runs both of its
    products in h's dtype (bf16 x bf16 with bf16 compute, accumulated in float32)."""
    logits, _ = _logits(h, table, softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(targets >= 0, lse - picked, 0.0))


def _token_losses_fwd(h, table, targets, softcap):
    return _token_losses(h, table, targets, softcap), (h, table, targets)


def _token_losses_bwd(softcap, residuals, g):
    h, table, targets = residuals
    logits, raw = _logits(h, table, softcap)
    probs = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(jnp.maximum(targets, 0), logits.shape[-1], dtype=probs.dtype)
    d = (probs - onehot) * (g * (targets >= 0))[:, None]
    if softcap is not None:
        d = d * (1.0 - jnp.square(jnp.tanh(raw / softcap)))
    d = d.astype(h.dtype)
    w = table.astype(h.dtype)
    dh = jnp.einsum("nv,vd->nd", d, w, preferred_element_type=jnp.float32).astype(h.dtype)
    dw = jnp.einsum("nv,nd->vd", d, h, preferred_element_type=jnp.float32).astype(table.dtype)
    return dh, dw, None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def _chunked_loss(h: jax.Array, table: jax.Array, targets: jax.Array, chunk: int,
                  softcap: float | None) -> jax.Array:
    n, d = h.shape
    chunk = max(1, min(int(chunk), n))
    pad = -n % chunk
    h = jnp.pad(h, ((0, pad), (0, 0)))
    targets = jnp.pad(targets, (0, pad), constant_values=IGNORE_INDEX)

    def body(total, xs):
        return total + _token_losses(xs[0], table, xs[1], softcap), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (h.reshape(-1, chunk, d), targets.reshape(-1, chunk)))
    return total


def next_token_loss(model: Model, batch: TrainBatch, *, chunk: int = DEFAULT_CHUNK,
                    compute_dtype: Any = None, remat: str = "none",
                    scan: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(loss_sum, n_tokens)``: the summed next-token cross entropy (float32) and the number of
    tokens it counts (int32), ``chunk`` tokens projected onto the vocabulary at a time.

    Each chunk's logits exist only inside that chunk, forward and backward (a custom VJP that
    recomputes them). The tied embedding enters each chunk in its parameter dtype and is cast
    there, so its gradient accumulates over the chunks in that dtype (float32 masters: float32)."""
    if int(chunk) < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    table = _decoder(model).embedding[...]
    softcap = _decoder(model).config.final_logit_softcapping
    h = forward_hidden(model, batch, compute_dtype=compute_dtype, remat=remat, scan=scan)
    hs, targets = _shifted(h, batch.labels)
    total = _chunked_loss(hs, table, targets, chunk, softcap)
    return total, jnp.sum(targets >= 0).astype(jnp.int32)


def naive_next_token_loss(model: Model, batch: TrainBatch, *, compute_dtype: Any = None,
                          remat: str = "none", scan: bool = False) -> tuple[jax.Array, jax.Array]:
    """:func:`next_token_loss` from the whole ``[B, T, V]`` float32 logits (the model's own
    ``logits``): for tests and memory comparisons."""
    model = in_compute_dtype(model, compute_dtype)
    h = forward_hidden(model, batch, remat=remat, scan=scan)
    logits = _decoder(model).logits(h)[:, :-1]
    targets = jnp.asarray(batch.labels, jnp.int32)[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    valid = targets >= 0
    return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid).astype(jnp.int32)
