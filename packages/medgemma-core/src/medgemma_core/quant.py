"""Weight-only int8 for inference: symmetric int8 weights with float32 scales.

``quantize(model, "int8")`` replaces every decoder projection (q, k, v, o, gate, up, down)
and the tied embedding of a :class:`~medgemma_core.transformer.Gemma3` in place by a
:class:`QWeight` (``values`` int8 in the parameter's layout, ``scale`` float32). Two modes:

* ``"int8"``: one scale per output channel (``max|w| / 127`` over the contracted axes); the
  embedding gets one scale per vocabulary row, used both for the lookup and for the logits.
* ``"int8-g32"``: one scale per group of 32 consecutive weights along the contracted axes
  (flattened: o's heads x head_dim, as Hugging Face stores it; llama.cpp's Q8_0 blocks; a
  Q8_0 GGUF file loads into this mode without any float copy of its weights, :class:`Q8Source`).
* ``"-mse"`` (``"int8-mse"``, ``"int8-g32-mse"``): each scale searched, on the weights alone,
  for the least squared error (:func:`search_scales`, in :mod:`medgemma_core.quant_search`)
  instead of ``max|w| / 127``.
* ``"-ftable"``: the tied embedding / logits table stays in the model's dtype (only the
  projections are int8): for a 262144-row table 4 bytes a weight in float32 instead of 1.

A mode is a :class:`Scheme`; :func:`quantize` also takes a Scheme (for experiments: e.g.
the table alone quantized). Only the named :data:`MODES` can be saved.

Activations stay in the model's compute dtype. A product ``x @ w`` converts the int8 weight
inside the computation: on accelerators XLA fuses the conversion into the dot; on the CPU
XLA materializes the converted operand, so the weight is walked in chunks of about
:data:`CHUNK_BYTES` (as float32) that stay in cache (a loop over the contracted axis, or over
vocabulary rows for the logits), and never exists as a full-size float32 copy. Per-channel
scales multiply the output; group scales multiply each converted chunk.

Call sites read parameters as ``module.q[...]``; a :class:`QWeight` answers that with a
:class:`QArray` (a pytree of the two arrays), which :func:`dot`, :func:`take` and
:func:`logits` consume (``layers.matmul``, ``layers.vocab_projection`` and
``Gemma3.embed`` dispatch on it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from medsiglip.sharding import param

from .quant_search import SEARCH_K, block_k, search_scales  # noqa: F401 (re-exported)

__all__ = ["CHUNK_BYTES", "MODES", "QArray", "QWeight", "Scheme", "check_mode", "dot",
           "is_quantized", "logits", "mode_of", "q8_0_mode", "quantize", "quantize_array",
           "quantized_specs", "scheme", "search_scales", "take", "Q8Source", "Q8_0_BLOCK"]


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How a decoder is quantized. ``group`` (the q, k, v, o, gate, up, down projections) and
    ``table`` (the tied embedding, per vocabulary row): 0 one scale per output channel, n one
    per group of n along the contracted axis, None left in the model's dtype. ``search``:
    scales from :func:`search_scales` (least squared error) instead of ``max|w| / 127``."""

    group: int | None = 0
    table: int | None = 0
    search: bool = False


MODES = {
    "int8": Scheme(0, 0), "int8-g32": Scheme(32, 32),
    "int8-mse": Scheme(0, 0, True), "int8-g32-mse": Scheme(32, 32, True),
    "int8-ftable": Scheme(0, None), "int8-g32-ftable": Scheme(32, None),
    "int8-g32-mse-ftable": Scheme(32, None, True),
}
CHUNK_BYTES = 1 << 19  # CPU: float32 bytes of weight converted per step of a chunked product
GEMV = True  # CPU: a single row's logits as one fused matrix-vector product (else chunked)
# contracted ("in") axes of each quantized parameter in our layout (see checkpoints.names)
IN_AXES = {"embedding": (1,), "q": (0,), "k": (0,), "v": (0,), "o": (0, 1), "gate": (0,),
           "up": (0,), "down": (0,)}


def check_mode(mode: str | None) -> str | None:
    """``mode`` itself when it is None or a known mode, else one clear ValueError."""
    if mode is None or mode in MODES:
        return mode
    raise ValueError(f"unknown quantize mode {mode!r}; use one of {', '.join(MODES)} "
                     f"(or none for float weights)")


def scheme(mode: str | Scheme) -> Scheme:
    """The :class:`Scheme` of a mode name (a Scheme is returned as it is)."""
    return mode if isinstance(mode, Scheme) else MODES[check_mode(mode)]


def _name(sch: Scheme) -> str | None:
    return next((m for m, s in MODES.items() if s == sch), None)


def q8_0_mode(mode: str) -> str:
    """The mode a GGUF file with Q8_0 weights loads into when ``mode`` is asked for: groups of
    32 (the file's own blocks, loaded as stored), the rest of ``mode`` kept."""
    sch = scheme(mode)
    want = Scheme(32, None if sch.table is None else 32, sch.search)
    return _name(want) or "int8-g32"


@struct.dataclass
class QArray:
    """An int8 weight as the product code sees it: ``values * scale``, broadcast (with groups,
    ``values`` viewed as :func:`grouped_shape` first)."""

    values: jax.Array
    scale: jax.Array
    in_axes: tuple[int, ...] = struct.field(pytree_node=False)
    group: int = struct.field(pytree_node=False, default=0)
    compute: Any = struct.field(pytree_node=False, default=jnp.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def dtype(self):
        """The compute dtype (what the weight is converted to inside a product)."""
        return jnp.dtype(self.compute)

    def dequantize(self, dtype=None) -> jax.Array:
        """The whole weight in ``dtype`` (default: the compute dtype): for tests and export,
        never on the inference path."""
        return _dequant(self.values, self.scale, self.in_axes, self.group,
                        dtype or self.compute, per_channel=True)


def _dequant(values, scale, in_axes, group, dtype, *, per_channel: bool) -> jax.Array:
    w = values.astype(dtype)
    if group:
        shape = w.shape
        w = w.reshape(grouped_shape(shape, in_axes, group))
        return (w * scale.astype(dtype)).reshape(shape)
    return w * scale.astype(dtype) if per_channel else w


class QWeight(nnx.Module):
    """A quantized parameter: ``values`` (int8, the float parameter's shape and axis names)
    and ``scale`` (float32). ``weight[...]`` is its :class:`QArray`."""

    def __init__(self, values, scale, *, in_axes: tuple[int, ...], group: int,
                 names: tuple[Any, ...], compute=jnp.float32, mode: str | None = None):
        self.values = param(values, names)
        self.scale = param(scale, _scale_names(names, in_axes, group))
        self.in_axes = tuple(in_axes)
        self.group = int(group)
        self.compute = jnp.dtype(compute)
        self.mode = mode  # the quantize mode it came from (for saving)

    def __getitem__(self, key) -> QArray:
        if key is not Ellipsis:
            raise TypeError("a quantized weight is read whole: weight[...]")
        return QArray(self.values[...], self.scale[...], self.in_axes, self.group, self.compute)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def dtype(self):
        return self.compute


def _scale_names(names, in_axes, group) -> tuple[Any, ...]:
    if not group:
        return tuple(None if i in in_axes else n for i, n in enumerate(names))
    if _trailing(names, in_axes):
        return (*names[:-1], None, None)
    return (None, None, *names[len(in_axes):])


def _trailing(shape, in_axes) -> bool:
    """Whether the contracted axis is the last one (the embedding); else they lead."""
    if in_axes == (len(shape) - 1,) and len(shape) > 1:
        return True
    if in_axes != tuple(range(len(in_axes))):
        raise ValueError(f"internal: contracted axes {in_axes} neither lead nor trail")
    return False


def grouped_shape(shape, in_axes, group) -> tuple[int, ...]:
    """``shape`` with the contracted axes flattened and split into ``(n, group)``."""
    shape = tuple(shape)
    if _trailing(shape, in_axes):
        return (*shape[:-1], shape[-1] // group, group)
    flat = math.prod(shape[:len(in_axes)])
    return (flat // group, group, *shape[len(in_axes):])


def scale_shape(shape, in_axes, group) -> tuple[int, ...]:
    """Per-channel: ``shape`` with the contracted axes 1; groups: :func:`grouped_shape` with
    the group axis 1."""
    if not group:
        return tuple(1 if i in in_axes else d for i, d in enumerate(shape))
    g = grouped_shape(shape, in_axes, group)
    axis = len(g) - 1 if _trailing(shape, in_axes) else 1
    return (*g[:axis], 1, *g[axis + 1:])


def check_groups(shape, in_axes, group, what: str = "weight") -> None:
    flat = math.prod(shape[a] for a in in_axes)
    if group and flat % group:
        raise ValueError(f"{what}: its {flat} contracted weights per channel are not a multiple "
                         f"of the group size {group}; quantize with mode 'int8'")


def quantize_array(w, in_axes: tuple[int, ...], group: int = 0, *, xp=jnp,
                   search: bool = False):
    """``(values int8, scale float32)``: symmetric, ``scale = max|w| / 127`` over each output
    channel's contracted axes (``group=0``) or over each group of ``group`` consecutive weights
    along the last contracted axis; ``values = clip(round(w / scale), -127, 127)``. ``xp``:
    ``jnp`` (traceable) or ``np`` (the checkpoint loader, one tensor at a time). ``search``
    (numpy only): ``scale = max|w| / k`` with the ``k`` of :func:`search_scales`."""
    w = xp.asarray(w).astype(xp.float32)
    shape = tuple(w.shape)
    check_groups(shape, in_axes, group)
    if group:
        grouped = w.reshape(grouped_shape(shape, in_axes, group))
        axis = grouped.ndim - 1 if _trailing(shape, in_axes) else 1
        amax = xp.max(xp.abs(grouped), axis=axis, keepdims=True)
    else:
        grouped = w
        axis = in_axes
        amax = xp.max(xp.abs(w), axis=in_axes, keepdims=True)
    if search and xp is np:
        k = block_k(grouped, axis, amax.shape)
        scale = np.where(amax > 0, amax / k, 1.0).astype(np.float32)
    else:
        scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    values = xp.clip(xp.round(grouped / scale), -127, 127).astype(xp.int8).reshape(shape)
    return values, scale


# ---- the model -------------------------------------------------------------------------------
def _targets(model: nnx.Module) -> Iterable[tuple[tuple, nnx.Module, str]]:
    """``(path, module, attribute)`` of every quantizable parameter of a Gemma3 decoder."""
    if hasattr(model, "embedding"):
        yield ("embedding",), model, "embedding"
    for i, block in enumerate(model.layers):
        for name in ("q", "k", "v", "o"):
            yield ("layers", i, "attn", name), block.attn, name
        for name in ("gate", "up", "down"):
            yield ("layers", i, "mlp", name), block.mlp, name


def quantize(model: nnx.Module, mode: str | Scheme = "int8") -> nnx.Module:
    """Quantize a :class:`~medgemma_core.transformer.Gemma3` (or the ``decoder`` of an
    image-text model) in place and return it. Already quantized weights stay as they are."""
    sch = scheme(mode)
    name_ = mode if isinstance(mode, str) else _name(sch)
    decoder = getattr(model, "decoder", model)
    compute = jnp.dtype(decoder.dtype)
    for path, module, name in _targets(decoder):
        var = getattr(module, name)
        group = sch.table if name == "embedding" else sch.group
        if isinstance(var, QWeight) or group is None:
            continue
        in_axes = IN_AXES[name]
        check_groups(var.shape, in_axes, group, "/".join(map(str, path)))
        w = var[...]
        if isinstance(w, jax.core.Tracer):  # an abstract module (abstract_quantized)
            values, scale = quantize_array(w, in_axes, group)
        else:  # on the host, in numpy: XLA's division may round a tie the other way
            values, scale = quantize_array(np.asarray(w, np.float32), in_axes, group, xp=np,
                                           search=sch.search)
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        setattr(module, name, QWeight(values, scale, in_axes=in_axes, group=group,
                                      names=tuple(names), compute=compute, mode=name_))
        del var
    return model


def _first_qweight(model: nnx.Module) -> QWeight | None:
    decoder = getattr(model, "decoder", model)
    return next((getattr(m, n) for _, m, n in _targets(decoder)
                 if isinstance(getattr(m, n), QWeight)), None)


def is_quantized(model: nnx.Module) -> bool:
    return _first_qweight(model) is not None


def mode_of(model: nnx.Module) -> str | None:
    """The quantize mode of a model (None: float weights)."""
    w = _first_qweight(model)
    if w is None:
        return None
    if w.mode is None:
        raise ValueError("this model was quantized with a Scheme that has no mode name; only "
                         f"the modes {', '.join(MODES)} can be saved")
    return w.mode


# ---- products --------------------------------------------------------------------------------
def _chunks(rows: int, row_bytes: int, step: int = 1) -> int:
    """Rows per chunk: a divisor of ``rows`` (a multiple of ``step``) with about CHUNK_BYTES."""
    if jax.default_backend() != "cpu":
        return rows
    want = max(step, CHUNK_BYTES // max(row_bytes, 1))
    for r in range(min(want, rows), 0, -1):
        if rows % r == 0 and r % step == 0:
            return r
    return rows


def _pin(x, w):
    """On the CPU, ``w`` (a chunk) cannot be read or converted before ``x`` exists (an
    optimization barrier, as ``layers.pin_to``): XLA cannot convert chunks ahead of their
    products, nor hoist the conversions out of the decode loop."""
    if jax.default_backend() != "cpu":
        return x, w
    return jax.lax.optimization_barrier((x, w))


def _split_spec(spec: str) -> tuple[str, str, str]:
    ins, out = spec.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    return xs, ws, out


def _axis(spec: str, letter: str, ndim: int) -> int:
    """The axis of ``letter`` in an operand of ``ndim`` dims with spec ``spec`` ('...' first)."""
    body = spec.replace("...", "")
    return ndim - (len(body) - body.index(letter))


def dot(x: jax.Array, w: QArray, spec: str) -> jax.Array:
    """``einsum(spec, x, w)`` accumulated in float32 and cast to x's dtype, for a weight whose
    first axis is contracted (every decoder projection). On the CPU the weight is converted
    in chunks of its first axis inside a loop."""
    xs, ws, out = _split_spec(spec)
    if ws[0] in out:
        raise ValueError(f"quant.dot: the weight's first axis must be contracted ({spec})")
    vals = w.values
    rows = vals.shape[0]
    inner = math.prod(vals.shape[1:len(w.in_axes)])  # contracted weights per row of axis 0
    step = w.group // math.gcd(w.group, inner) if w.group else 1
    r = _chunks(rows, math.prod(vals.shape[1:]) * 4, step)
    ix = _axis(xs, ws[0], x.ndim)
    cdt = x.dtype

    def part(xc, vc, sc):
        xc, vc = _pin(xc, vc)
        wc = _dequant(vc, sc, w.in_axes, w.group, cdt, per_channel=False)
        return jnp.einsum(spec, xc, wc, preferred_element_type=jnp.float32)

    gs = w.scale if w.group else None
    srows = r * inner // w.group if w.group else r  # scale rows per chunk
    if r == rows:
        acc = part(x, vals, gs)
    else:

        def body(i, acc):
            xc = jax.lax.dynamic_slice_in_dim(x, i * r, r, ix)
            vc = jax.lax.dynamic_slice_in_dim(vals, i * r, r, 0)
            sc = None if gs is None else jax.lax.dynamic_slice_in_dim(gs, i * srows, srows, 0)
            return acc + part(xc, vc, sc)

        first = part(jax.lax.slice_in_dim(x, 0, r, axis=ix), jax.lax.slice_in_dim(vals, 0, r),
                     None if gs is None else jax.lax.slice_in_dim(gs, 0, srows))
        acc = jax.lax.fori_loop(1, rows // r, body, first)
    if not w.group:
        acc = acc * _out_scale(w, ws, out, acc.ndim)
    return acc.astype(cdt)


def _out_scale(w: QArray, ws: str, out: str, ndim: int) -> jax.Array:
    """The per-channel scale laid out to broadcast against the product's output."""
    keep = [i for i in range(len(ws)) if i not in w.in_axes]
    s = w.scale.reshape([w.scale.shape[i] for i in keep])
    letters = [ws[i] for i in keep]
    body = out.replace("...", "")
    order = sorted(range(len(letters)), key=lambda j: body.index(letters[j]))
    s = jnp.transpose(s, order)
    size = {letters[j]: s.shape[k] for k, j in enumerate(order)}
    return s.reshape([size.get(c, 1) for c in body])


def _gemv_logits(h: jax.Array, table: QArray) -> jax.Array:
    """One row ``h [D]`` against the whole table: on the CPU, XLA emits a product of a vector
    with the transpose of a converted ``[V, D]`` matrix as one loop fusion over the table's
    rows (conversion, scales and dot fused, on every core, no float32 copy of the table)."""
    h, vals, scale = jax.lax.optimization_barrier((h, table.values, table.scale))
    w = _dequant(vals, scale, (1,), table.group, h.dtype, per_channel=False)
    out = jnp.matmul(h.reshape(1, -1), w.T, preferred_element_type=jnp.float32)
    return out if table.group else out * scale.reshape(-1)


def logits(h: jax.Array, table: QArray) -> jax.Array:
    """``h [..., D] @ table[V, D].T`` in float32; on the CPU in vocabulary chunks, or for a
    single row (batch-1 decode) as one fused matrix-vector product."""
    vals = table.values
    v, d = vals.shape
    cdt = h.dtype
    if jax.default_backend() == "cpu" and math.prod(h.shape[:-1]) == 1 and GEMV:
        return _gemv_logits(h, table).reshape(*h.shape[:-1], v)
    r = _chunks(v, d * 4)

    def part(vc, sc):
        _, vc = _pin(h, vc)
        wc = _dequant(vc, sc, (1,), table.group, cdt, per_channel=False)
        out = jnp.einsum("...d,vd->...v", h, wc, preferred_element_type=jnp.float32)
        return out if table.group else out * sc.reshape(-1)

    if r == v:
        return part(vals, table.scale)
    n = v // r
    out = jax.lax.map(lambda a: part(*a), (vals.reshape(n, r, d),
                                          table.scale.reshape(n, r, *table.scale.shape[1:])))
    return jnp.moveaxis(out, 0, -2).reshape(*h.shape[:-1], v)


def take(table: QArray, tokens: jax.Array) -> jax.Array:
    """Rows ``tokens`` of the table in the compute dtype (the embedding lookup)."""
    rows = jnp.take(table.values, tokens, axis=0)
    scales = jnp.take(table.scale, tokens, axis=0)
    return _dequant(rows, scales, (rows.ndim - 1,), table.group, table.compute,
                    per_channel=True)


# ---- checkpoints -------------------------------------------------------------------------------
def abstract_quantized(build: Callable[[Any], nnx.Module], mode: str | Scheme) -> nnx.Module:
    """``build(rngs)``'s module quantized, as ``jax.ShapeDtypeStruct`` leaves (no memory)."""
    from medsiglip.weights import abstract_module

    return abstract_module(lambda rngs: quantize(build(rngs), mode))


def quantized_specs(specs, mode: str | Scheme) -> list:
    """The checkpoint specs (:class:`medsiglip.weights.TensorSpec`) of a quantized decoder
    from those of the float one: each quantized parameter's spec becomes two (``values``,
    ``scale``) reading the same tensor, quantized once in numpy as it is read (one tensor at a
    time, so a load never holds the float model). A tensor read as raw Q8_0 blocks
    (:class:`Q8Source`) becomes values and scales as stored (nothing is quantized again), or
    is dequantized where the mode keeps it in float (``-ftable``)."""
    from medsiglip.weights import TensorSpec

    sch = scheme(mode)
    out = []
    for spec in specs:
        leaf = spec.path[-1]
        parent = spec.path[-2] if len(spec.path) > 1 else None
        if leaf not in IN_AXES or (leaf != "embedding" and parent not in ("attn", "mlp")):
            out.append(spec)
            continue
        group = sch.table if leaf == "embedding" else sch.group
        if group is None:  # kept in float: raw Q8_0 blocks are dequantized first
            out.append(dataclasses.replace(
                spec, convert=lambda raw, f=spec.convert: f(_float_of(raw))))
            continue
        in_axes = IN_AXES[leaf]
        memo: dict[str, Any] = {}

        def part(raw, which, spec=spec, in_axes=in_axes, memo=memo, group=group):
            if "pair" not in memo:  # the first of the two specs of this tensor
                if raw.dtype == Q8_0_BLOCK:
                    memo["pair"] = _native_layout(raw, spec, in_axes, group)
                else:
                    memo["pair"] = quantize_array(spec.convert(np.asarray(raw, np.float32)),
                                                  in_axes, group, xp=np, search=sch.search)
                memo["left"] = 2
            result = memo["pair"][which]
            memo["left"] -= 1
            if not memo["left"]:
                memo.clear()  # never hold a tensor past its load
            return result

        out.append(TensorSpec((*spec.path, "values"), spec.name, spec.shape,
                              lambda raw, part=part: part(raw, 0)))
        out.append(TensorSpec((*spec.path, "scale"), spec.name, spec.shape,
                              lambda raw, part=part: part(raw, 1)))
    return out


def _float_of(raw: np.ndarray) -> np.ndarray:
    """A tensor as float32 (raw Q8_0 blocks dequantized: ``d * qs``)."""
    if raw.dtype != Q8_0_BLOCK:
        return raw
    return (raw["d"].astype(np.float32)[..., None] * raw["qs"]).reshape(raw.shape[0], -1)


Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])  # llama.cpp's block_q8_0


def _native_layout(raw: np.ndarray, spec, in_axes, group):
    """Q8_0 blocks ([out, in / 32] of :data:`Q8_0_BLOCK`) -> our values and group scales,
    without a float copy of the weight."""
    if group != 32:
        raise AssertionError("internal: Q8_0 loads natively only into groups of 32")
    rows = raw.shape[0]
    scales = raw["d"].astype(np.float32)  # [out, in/32]
    values = np.ascontiguousarray(raw["qs"]).reshape(rows, -1)  # [out, in] int8
    ours = np.ascontiguousarray(spec.convert(values))
    del values
    shape = scale_shape(ours.shape, in_axes, group)
    if in_axes == (1,):  # the embedding: [V, D] as stored
        return ours, scales.reshape(shape)
    return ours, np.ascontiguousarray(scales.T).reshape(shape)


class Q8Source:
    """A GGUF :class:`~medsiglip.weights.TensorSource` whose quantizable Q8_0 tensors come
    back as their raw blocks (:data:`Q8_0_BLOCK`), for :func:`quantized_specs`; every other
    tensor as the GGUF source gives it (dequantized)."""

    def __init__(self, source):
        self.source = source

    def names(self):
        return self.source.names()

    def shape(self, name):
        return self.source.shape(name)

    def where(self, name):
        return self.source.where(name)

    def get(self, name):
        if self.source.is_q8_0(name) and not name.endswith("norm.weight"):
            raw = self.source.raw(name)
            return raw.view(Q8_0_BLOCK).reshape(raw.shape[0], -1)
        return self.source.get(name)
