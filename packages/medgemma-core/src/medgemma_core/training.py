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
tokens at a time onto the 262,208-row vocabulary with a custom VJP whose forward pass also
computes the gradients (no logits are recomputed; the table's gradient only when the table
trains; every product in the compute dtype), and only for the rows that carry a label (the
prompt, padding and image rows cost no vocabulary product): it never holds the ``[B, T, V]``
float32 logits that :func:`naive_next_token_loss` builds.

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
from .packing import check_segment_ids, pack_rows
from .processor import IGNORE_INDEX, TrainingBatch
from .transformer import Gemma3

__all__ = ["DEFAULT_CHUNK", "IGNORE_INDEX", "TrainBatch", "forward_hidden", "in_compute_dtype",
           "naive_next_token_loss", "next_token_loss", "pack_rows"]

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
    ``image_mask`` bool ``[B, N]``, or both None (text only). ``segment_ids``: int32 ``[B, T]``
    for packed text-only rows (:func:`pack_rows`): ``1..n`` the sequences of a row in order,
    ``0`` padding; each segment is attended, positioned (RoPE from 0) and scored as if alone."""

    tokens: Any
    labels: Any
    attention_mask: Any
    pixels: Any = None
    image_mask: Any = None
    segment_ids: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, np.ndarray | jax.Array) or isinstance(self.tokens,
                                                                             jax.core.Tracer):
            return  # pytree plumbing (tracers, shape structs, shardings): nothing to check
        shape = tuple(self.tokens.shape)
        if len(shape) != 2:
            raise ValueError(f"tokens must be [B, T], got shape {list(shape)}")
        for name in ("labels", "attention_mask", "segment_ids"):
            if getattr(self, name) is None and name == "segment_ids":
                continue
            got = tuple(np.shape(getattr(self, name)))
            if got != shape:
                raise ValueError(f"{name} has shape {list(got)} but tokens {list(shape)}; "
                                 f"build the batch with TrainBatch.from_collated")
        if isinstance(self.segment_ids, np.ndarray):
            check_segment_ids(self.segment_ids)
        if self.segment_ids is not None and self.pixels is not None:
            raise ValueError("packed rows (segment_ids) are text-only; pass pixels=None or "
                             "build image-text batches unpacked")
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
    seg = batch.segment_ids
    if seg is not None:
        if batch.pixels is not None:
            raise ValueError("packed rows (segment_ids) are text-only; pass pixels=None or "
                             "build image-text batches unpacked")
        seg = jnp.asarray(seg, jnp.int32)
    if isinstance(model, Gemma3Multimodal):
        image_id = image_blocks(tokens, model.config.image_token_id)
        h, _ = decoder(tokens, embeddings=_image_text_embeddings(model, batch, remat, scan),
                       start=start, image_id=image_id, segment_ids=seg, logits_at="none",
                       remat=remat, scan=scan)
        return h
    if batch.pixels is not None:
        raise ValueError("a text-only Gemma3 model got a batch with images; load the image-text "
                         "model (Gemma3Multimodal) or build the batch with slots=0")
    h, _ = decoder(tokens, start=start, segment_ids=seg, logits_at="none", remat=remat,
                   scan=scan)
    return h


# ---- loss -----------------------------------------------------------------------------------
def _targets(batch: TrainBatch) -> jax.Array:
    """``labels[:, 1:]`` [B, T-1] (< 0: none), the targets of positions 0..T-2; with packed
    rows, none where position t+1 starts a segment (or is padding): no segment's token is
    predicted from another segment's last position."""
    targets = jnp.asarray(batch.labels, jnp.int32)[:, 1:]
    if batch.segment_ids is not None:
        seg = jnp.asarray(batch.segment_ids, jnp.int32)
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        targets = jnp.where(same, targets, IGNORE_INDEX)
    return targets


def _shifted(h: jax.Array, batch: TrainBatch) -> tuple[jax.Array, jax.Array]:
    """Hidden states ``[B*(T-1), D]`` at 0..T-2 and their targets (:func:`_targets`)."""
    return h[:, :-1].reshape(-1, h.shape[-1]), _targets(batch).reshape(-1)


def _head(x: jax.Array, w: jax.Array, t: jax.Array, softcap: float | None, grads: bool,
          dw: jax.Array | None):
    """One chunk: ``x [c, D]`` (compute dtype), ``w [V, D]`` (cast to it), targets ``t [c]``
    (< 0: no loss). Returns ``(loss_sum, dx [c, D] f32, dw)``: ``dx`` None unless ``grads``;
    ``dw`` (the table's float32 gradient accumulator ``[V, D]``, or None) with this chunk's
    added. The target's logit comes from the gathered row ``w[t]`` (not from a masked pass
    over the ``[c, V]`` logits); ``dx = d @ w`` and ``dw += d^T x`` with ``d`` = softmax -
    one-hot (float32, cast to the compute dtype for its products)."""
    raw = jnp.einsum("nd,vd->nv", x, w, preferred_element_type=jnp.float32)
    logits = raw if softcap is None else jnp.tanh(raw / softcap) * softcap
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(s))[:, 0]
    valid = t >= 0
    tt = jnp.maximum(t, 0)
    wy = w[tt].astype(jnp.float32)  # [c, D]: the targets' rows
    raw_y = jnp.sum(x.astype(jnp.float32) * wy, axis=-1)
    picked = raw_y if softcap is None else jnp.tanh(raw_y / softcap) * softcap
    total = jnp.sum(jnp.where(valid, lse - picked, 0.0))
    if not grads:
        return total, None, dw
    p = e * (valid[:, None] / s)
    coef = valid.astype(jnp.float32)
    if softcap is not None:  # d logits / d raw = 1 - tanh^2
        p = p * (1.0 - jnp.square(jnp.tanh(raw / softcap)))
        coef = coef * (1.0 - jnp.square(jnp.tanh(raw_y / softcap)))
    p = p.at[jnp.arange(p.shape[0]), tt].add(-coef).astype(x.dtype)  # softmax - one-hot
    dx = jnp.einsum("nv,vd->nd", p, w, preferred_element_type=jnp.float32)
    if dw is not None:
        dw = dw + jnp.einsum("nv,nd->vd", p, x, preferred_element_type=jnp.float32)
    return total, dx, dw


def _sizes(chunk: int, n: int) -> list[int]:
    """Chunk sizes: ``c`` = ``chunk`` or just under it, so that ``n`` rows split into equal
    chunks (2,044 rows, chunk 512: 4 x 511; a fully labelled batch then has no tail), as many
    as fit, then at most one each of c/2, /4, /8, so the last rows are projected with little
    padding (at most c/8 - 1 padded rows). Measured on the 270M LoRA step (6 layers, batch 4 x
    512, all rows labelled): the tail's four small products (256 + 128 + 64 + 64 rows) made
    the step 24.3 CPU s against 22.2 with equal chunks."""
    c = max(1, min(int(chunk), n))
    c = -(-n // -(-n // c))  # ceil(n / number of chunks): equal chunks of the n rows
    return sorted({max(1, c >> k) for k in range(4)}, reverse=True)


def _chunks(hs: jax.Array, table: jax.Array, targets: jax.Array, chunk: int,
            softcap: float | None, grads: bool, want_dw: bool):
    """The loss (and gradients) of the counted rows only: they are moved to the front (a stable
    sort), and chunks are projected while counted rows remain (a ``while_loop`` of full chunks,
    then smaller ones for the rest), so rows without a label (prompts, padding, images) cost no
    vocabulary product. Returns ``(loss_sum, dh [n, D] f32 | None, dw [V, D] f32 | None)``."""
    n, d = hs.shape
    sizes = _sizes(chunk, n)
    c = sizes[0]
    w = table.astype(hs.dtype)
    valid = targets >= 0
    order = jnp.argsort(jnp.logical_not(valid).astype(jnp.int32), stable=True)
    n_valid = jnp.sum(valid).astype(jnp.int32)
    x_all = jnp.pad(hs[order], ((0, c), (0, 0)))  # room for a last chunk past the end
    t_all = jnp.pad(targets[order], (0, c), constant_values=IGNORE_INDEX)
    init = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
            jnp.zeros((n + c, d), jnp.float32) if grads else None,
            jnp.zeros(w.shape, jnp.float32) if want_dw else None)

    def step(size):
        def run(carry):
            start, total, dx, dw = carry
            x = jax.lax.dynamic_slice_in_dim(x_all, start, size)
            t = jax.lax.dynamic_slice_in_dim(t_all, start, size)
            loss, gx, dw = _head(x, w, t, softcap, grads, dw)
            if grads:
                dx = jax.lax.dynamic_update_slice_in_dim(dx, gx, start, axis=0)
            return start + size, total + loss, dx, dw
        return run

    carry = jax.lax.while_loop(lambda cr: cr[0] + c <= n_valid, step(c), init)
    for size in sizes[1:]:
        carry = jax.lax.cond(n_valid - carry[0] >= size, step(size), lambda cr: cr, carry)
    carry = jax.lax.cond(n_valid > carry[0], step(sizes[-1]), lambda cr: cr, carry)
    _, total, dx, dw = carry
    if grads:
        dx = jnp.zeros((n, d), jnp.float32).at[order].set(dx[:n])
    return total, dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _token_losses(hs: jax.Array, table: jax.Array, targets: jax.Array, chunk: int,
                  softcap: float | None) -> jax.Array:
    """Summed cross entropy of ``hs [n, D]`` against ``targets [n]`` (< 0: no loss) over the
    vocabulary ``table [V, D]`` (cast to hs's dtype; products accumulated in float32). Under
    differentiation the forward pass computes the gradients too (as Liger's fused linear cross
    entropy): no logits are recomputed, and the table's gradient (a third product per chunk)
    only when the table is differentiated (frozen for LoRA)."""
    return _chunks(hs, table, targets, chunk, softcap, False, False)[0]


def _token_losses_fwd(hs, table, targets, chunk, softcap):
    want_dw = bool(table.perturbed)
    total, dx, dw = _chunks(hs.value, table.value, targets.value, chunk, softcap, True, want_dw)
    return total, (dx.astype(hs.value.dtype), dw.astype(table.value.dtype) if want_dw else None)


def _token_losses_bwd(chunk, softcap, residuals, g):
    dx, dw = residuals
    return (g * dx).astype(dx.dtype), None if dw is None else (g * dw).astype(dw.dtype), None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd, symbolic_zeros=True)


def next_token_loss(model: Model, batch: TrainBatch, *, chunk: int = DEFAULT_CHUNK,
                    compute_dtype: Any = None, remat: str = "none",
                    scan: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(loss_sum, n_tokens)``: the summed next-token cross entropy (float32) and the number of
    tokens it counts (int32), ``chunk`` tokens projected onto the vocabulary at a time.

    Each chunk's logits exist only inside that chunk; under differentiation the forward pass
    computes the gradients from them (a custom VJP), and only the counted tokens are projected
    (moved to the front, ``chunk`` at a time, then smaller chunks for the rest). The tied
    embedding enters in its parameter dtype and is cast to the compute dtype for the products;
    its gradient (when it trains) accumulates over the chunks in float32 and lands in its
    parameter dtype."""
    if int(chunk) < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    table = _decoder(model).embedding[...]
    softcap = _decoder(model).config.final_logit_softcapping
    h = forward_hidden(model, batch, compute_dtype=compute_dtype, remat=remat, scan=scan)
    hs, targets = _shifted(h, batch)
    total = _token_losses(hs, table, targets, int(chunk), softcap)
    return total, jnp.sum(targets >= 0).astype(jnp.int32)


def naive_next_token_loss(model: Model, batch: TrainBatch, *, compute_dtype: Any = None,
                          remat: str = "none", scan: bool = False) -> tuple[jax.Array, jax.Array]:
    """:func:`next_token_loss` from the whole ``[B, T, V]`` float32 logits (the model's own
    ``logits``): for tests and memory comparisons."""
    model = in_compute_dtype(model, compute_dtype)
    h = forward_hidden(model, batch, remat=remat, scan=scan)
    logits = _decoder(model).logits(h)[:, :-1]
    targets = _targets(batch)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    valid = targets >= 0
    return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid).astype(jnp.int32)
