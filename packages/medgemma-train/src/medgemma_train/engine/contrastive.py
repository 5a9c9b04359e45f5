"""The SigLIP sigmoid loss chunked across data-parallel devices: texts travel round a ring.

For normalized image embeddings ``I [B, D]`` and text embeddings ``T [B, D]`` (row ``i`` of
each a matching pair), the loss is ``-sum_ij log_sigmoid(y_ij z_ij) / B`` with
``z = I T^T exp(t) + b`` and ``y = 2 eye(B) - 1`` (medsiglip's :func:`~medsiglip.sigmoid_loss`).

Under ``shard_map`` over the mesh's batch axes (``n`` devices, ``b = B / n`` rows each), each
device keeps its images and passes its texts on: at round ``k`` it holds the texts of device
``i - k`` and adds the ``[b, b]`` block of their logits (positives on the diagonal only at
round 0, where the texts are its own), then ``ppermute`` hands them to device ``i + 1``.
After ``n`` rounds every image has met every text; a ``psum`` adds the devices' sums. No
device ever holds more than a ``[b, b]`` block (big_vision's "chunked" sigmoid loss,
Zhai et al. 2023, section 3.3); the backward pass sends the text gradients back round the
ring (the transpose of ``ppermute``). On one device (no batch axis) the loss is
medsiglip's :func:`~medsiglip.chunked_sigmoid_loss`, ``chunk`` texts at a time, when
``chunk`` is set.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

__all__ = ["batch_axes", "ring_sigmoid_loss", "sigmoid_loss_sum"]


def _block_sum(img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array,
               positive: bool | jax.Array) -> jax.Array:
    """``sum_ij log_sigmoid(y_ij z_ij)`` of one ``[b, b]`` block (positives on the diagonal
    when ``positive``)."""
    z = img @ txt.T * jnp.exp(scale) + bias
    eye = jnp.eye(z.shape[0], z.shape[1], dtype=bool)
    labels = jnp.where(jnp.logical_and(eye, positive), 1.0, -1.0).astype(z.dtype)
    return jnp.sum(jax.nn.log_sigmoid(labels * z))


def sigmoid_loss_sum(img: jax.Array, txt: jax.Array, logit_scale: jax.Array,
                     logit_bias: jax.Array, *, chunk: int = 0) -> jax.Array:
    """``B * loss`` on one device (``chunk`` texts at a time when ``chunk`` divides B)."""
    b = img.shape[0]
    if chunk and b % chunk == 0 and chunk < b:
        from medsiglip import chunked_sigmoid_loss

        return chunked_sigmoid_loss(img, txt, logit_scale, logit_bias, chunk_size=chunk) * b
    return -_block_sum(img, txt, logit_scale, logit_bias, True)


def batch_axes(mesh: Any, rows: int) -> tuple[str, ...]:
    """The mesh axes the batch is split over (size > 1), by the logical-axis rules."""
    from medgemma_core.sharding import logical_to_mesh

    if mesh is None or not getattr(mesh, "shape", None):
        return ()
    spec = logical_to_mesh(("batch",), dict(mesh.shape), (rows,))
    entry = spec[0] if len(spec) else None
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    return tuple(a for a in names if mesh.shape[a] > 1)


def ring_sigmoid_loss(img: jax.Array, txt: jax.Array, logit_scale: jax.Array,
                      logit_bias: jax.Array, *, mesh: Any = None, chunk: int = 0
                      ) -> jax.Array:
    """The mean sigmoid loss of ``[B, D]`` embeddings (see the module docstring), summed
    over a ring of the ``mesh``'s batch axes (None: the mesh of ``jax.set_mesh``); one device
    or no batch axis: computed in place. Returns ``B * loss`` (the sum over images), so that
    the engine divides by the rows it counts."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    rows = img.shape[0]
    axes = batch_axes(mesh, rows)
    scale = jnp.reshape(logit_scale, ()).astype(jnp.float32)
    bias = jnp.reshape(logit_bias, ()).astype(jnp.float32)
    img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)
    if not axes:
        return sigmoid_loss_sum(img, txt, scale, bias, chunk=chunk)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    if rows % n:
        raise ValueError(f"batch {rows} does not split over {n} devices ({', '.join(axes)}); "
                         f"make data.batch_size a multiple of {n}")
    ring = [(i, (i + 1) % n) for i in range(n)]

    def local(img_l: jax.Array, txt_l: jax.Array, s: jax.Array, b: jax.Array) -> jax.Array:
        def round_(k: jax.Array, carry: tuple[jax.Array, jax.Array]
                   ) -> tuple[jax.Array, jax.Array]:
            total, texts = carry
            total = total + _block_sum(img_l, texts, s, b, k == 0)
            return total, jax.lax.ppermute(texts, axes, ring)

        total, _ = jax.lax.fori_loop(0, n, round_, (jnp.zeros((), jnp.float32), txt_l))
        return -jax.lax.psum(total, axes)

    spec = P(axes, None)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P(),
                       check_vma=False)
    return fn(img, txt, scale, bias)
