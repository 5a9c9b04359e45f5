"""LoRA adapters for every linear projection of medsiglip's and medgemma-core's models.

A module with projections lists them in ``lora_targets`` (parameter name -> number of input
axes of its kernel: 1 for ``[D, ...]`` kernels, 2 for Gemma's ``o [H, Hd, D]``) and holds
``self.lora`` (``None``, or an ``nnx.Dict`` parameter name -> :class:`LoRA`); its forward
adds the adapter's output to the base product (:func:`adapt`). :func:`apply_lora` attaches
adapters without changing any base parameter path, so checkpoints load before or after::

    model = medgemma_core.load(folder)
    apply_lora(model, LoRAConfig(rank=16, alpha=16, dropout=0.05), rngs=nnx.Rngs(0))
    wrt = trainable_filter(model, decoder="lora", vision="frozen", projector="lora")
    optimizer = nnx.Optimizer(model, optax.adamw(2e-4), wrt=wrt)

An adapter of a kernel ``W [*in, *out]`` holds ``a [*in, r]`` (uniform in
``+-1/sqrt(fan_in)``, PEFT's default) and ``b [r, *out]`` (zeros) and adds
``dropout(x) @ a @ b * alpha / r``. Dropout is off until ``model.train()`` (and back off with
``model.eval()``); its random state lives in the adapter. The adapter's parameters are
``nnx.LoRAParam`` (a subclass of ``nnx.Param``), named for sharding like their kernel with a
replicated ``lora_rank`` axis.

:func:`merge_lora` folds each adapter into its kernel (``W += a @ b * scale``, computed in
float32) and marks it merged, so the forward no longer adds it; :func:`unmerge_lora` takes it
out again (exact up to the kernel dtype's rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from medsiglip.sharding import param_names

__all__ = ["DEFAULT_TARGETS", "LoRA", "LoRAConfig", "adapt", "adapters", "apply_lora", "flat_rows",
           "base_filter", "lora_filter", "merge_lora", "project", "trainable_filter",
           "unmerge_lora"]

#: Every projection of the transformer blocks: Gemma 3's q/k/v/o and gate/up/down, SigLIP's
#: q/k/v/out and fc1/fc2 (the encoder blocks of both towers; not the MAP pooling head nor the
#: text tower's final head), and MedGemma's projector.
DEFAULT_TARGETS = (r"attn/(q|k|v|o)$|mlp/(gate|up|down)$"
                   r"|encoder/layers/\d+/(self_attn/(q|k|v|out)_proj|mlp/fc[12])/kernel$"
                   r"|projector/weight$")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """``rank`` r, ``alpha`` (the scale is alpha / r), ``dropout`` on the adapter input in
    training, ``targets``: a regex searched in each projection's parameter path, e.g.
    ``"decoder/layers/0/attn/q"`` or ``"vision/encoder/layers/3/mlp/fc1/kernel"``."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        try:
            re.compile(self.targets)
        except re.error as exc:
            raise ValueError(f"LoRA targets {self.targets!r} is not a valid regex ({exc})"
                             ) from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRA(nnx.Module):
    """One adapter of a kernel ``[*in, *out]``: ``x [..., *in] -> [..., *out]``."""

    def __init__(self, kernel: nnx.Variable, n_in: int, config: LoRAConfig, *,
                 rngs: nnx.Rngs):
        shape, dtype = tuple(kernel.shape), kernel.dtype
        in_shape, out_shape = shape[:n_in], shape[n_in:]
        names = param_names(kernel) or (None,) * len(shape)
        r = config.rank
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(rngs.params(), (*in_shape, r), jnp.float32, -bound, bound)
        self.a = nnx.LoRAParam(a.astype(dtype), out_sharding=(*names[:n_in], "lora_rank"),
                               eager_sharding=False)
        self.b = nnx.LoRAParam(jnp.zeros((r, *out_shape), dtype),
                               out_sharding=("lora_rank", *names[n_in:]), eager_sharding=False)
        self.scale = float(config.scale)
        self.dropout = (_Dropout(config.dropout, deterministic=True, rngs=rngs)
                        if config.dropout > 0 else None)
        self.merged = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, r = self.a.ndim - 1, self.rank
        lead = x.shape[:x.ndim - n_in]
        if self.dropout is not None:
            x = self.dropout(x)
        a = self.a[...].reshape(-1, r).astype(x.dtype)
        b = self.b[...].reshape(r, -1).astype(x.dtype)
        rows = (-1,) if flat_rows() else lead  # see flat_rows
        out = _low_rank(x.reshape(*rows, a.shape[0]), a, b, self.scale)
        return out.reshape(*lead, *self.b.shape[1:])

    def delta(self) -> jax.Array:
        """``a @ b * scale`` in float32, shaped like the kernel ``[*in, *out]``."""
        r = self.rank
        a = self.a[...].astype(jnp.float32).reshape(-1, r)
        b = self.b[...].astype(jnp.float32).reshape(r, -1)
        return (a @ b * self.scale).reshape(*self.a.shape[:-1], *self.b.shape[1:])


class _Dropout(nnx.Dropout):
    """``nnx.Dropout`` with a cheaper mask: 16 random bits per element (two per 32-bit draw)
    compared with ``round(rate * 65536)``, instead of a float32 uniform per element. The rate
    is used to within 2**-17 (0.05 -> 0.050003); on a CPU the mask costs about a third as
    much, which matters for LoRA, whose every adapter input draws one."""

    def __call__(self, inputs, *, deterministic=None, rngs=None):
        det = self.deterministic if deterministic is None else deterministic
        if det or self.rate == 0.0 or self.broadcast_dims or inputs.shape[-1] % 2:
            return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
        key = rngs() if rngs is not None else self.rngs()
        cut = round(self.rate * 65536)
        half = (*inputs.shape[:-1], inputs.shape[-1] // 2)
        bits = jax.lax.bitcast_convert_type(jax.random.bits(key, half, jnp.uint32), jnp.uint16)
        keep = bits.reshape(inputs.shape) >= cut
        scale = jnp.asarray(65536 / (65536 - cut), inputs.dtype)
        return jnp.where(keep, inputs * scale, jnp.zeros((), inputs.dtype))


def _contract_lead(u: jax.Array, v: jax.Array) -> jax.Array:
    """``u [..., m]``, ``v [..., n]`` -> ``[m, n]``, summed over the leading axes (f32)."""
    lead = tuple(range(u.ndim - 1))
    return jax.lax.dot_general(u, v, ((lead, lead), ((), ())),
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``(x @ a) @ b * scale`` for ``x [..., K]``, ``a [K, r]``, ``b [r, N]`` (f32 accumulation,
    the result in ``x``'s dtype)."""
    return _low_rank_fwd(x, a, b, scale)[0]


def _low_rank_fwd(x, a, b, scale):
    h = jnp.matmul(x, a, preferred_element_type=jnp.float32).astype(x.dtype)
    out = jnp.matmul(h, b, preferred_element_type=jnp.float32) * scale
    return out.astype(x.dtype), (x, a, b, h)


def _low_rank_bwd(scale, res, g):
    # The weight gradients contract the (many) token axes. Written with the rank-r operand
    # first (``h^T g``, ``(g b^T)^T x``), XLA's CPU layout keeps the big [tokens, N] operand
    # as it is; autodiff's own order makes it copy that operand into a transposed layout
    # for every adapter (measured: a LoRA MLP's gradient 222 -> 120 ms CPU).
    x, a, b, h = res
    gs = (g * scale).astype(x.dtype)
    gh = jnp.matmul(gs, b.T, preferred_element_type=jnp.float32).astype(x.dtype)
    db = _contract_lead(h, gs).astype(b.dtype)
    da = _contract_lead(gh, x).T.astype(a.dtype)
    dx = jnp.matmul(gh, a.T, preferred_element_type=jnp.float32).astype(x.dtype)
    return dx, da, db


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


#: On CPUs, products over several leading axes ([B, T, K] x [K, N]) are taken as one 2-D
#: product of the flattened rows (:func:`flat_rows`); False: as written (for A/B measurements).
FLAT_PRODUCTS = True


def flat_rows() -> bool:
    """Whether projections flatten their leading axes into one row axis: on CPUs. The sums are
    the same; but autodiff's weight gradient of a product with two leading axes contracts two
    axes, which XLA on CPUs runs after copying the activation gradient into a transposed
    layout (a 270M full-fine-tuning step: 15.5 -> 12.1 CPU s flattened). Elsewhere the products
    keep their axes (and their sharding annotations)."""
    return FLAT_PRODUCTS and jax.default_backend() == "cpu"


#: Fewest rows (tokens) for which :func:`project` merges an adapter into the base product.
MERGE_ROWS = 256


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _merged(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``x @ (w + a @ b * scale)`` for ``x [M, K]``, ``w [K, N]``, ``a [K, r]``, ``b [r, N]``
    (f32 accumulation): the base product and a dropout-free adapter's in one product."""
    return _merged_fwd(*(_Primal(v) for v in (x, w, a, b)), scale)[0]


class _Primal:
    """A primal with nothing known about its perturbation (the undifferentiated call)."""

    def __init__(self, value):
        self.value, self.perturbed = value, True


def _merged_fwd(x, w, a, b, scale):
    want_dw = bool(w.perturbed)
    x, w, a, b = x.value, w.value, a.value, b.value
    merged = (w.astype(jnp.float32) + jnp.matmul(a, b, preferred_element_type=jnp.float32)
              * scale).astype(x.dtype)
    out = jnp.matmul(x, merged, preferred_element_type=jnp.float32).astype(x.dtype)
    h = jnp.matmul(x, a, preferred_element_type=jnp.float32).astype(x.dtype)
    return out, (x, merged, a, b, h, (jnp.zeros((), w.dtype),) if want_dw else ())


def _merged_bwd(scale, res, g):
    x, merged, a, b, h, dw_like = res  # dw_like: (a zero of w's dtype,) when w trains
    g = g.astype(x.dtype)
    gs = (g * scale).astype(x.dtype)
    gh = jnp.matmul(gs, b.T, preferred_element_type=jnp.float32).astype(x.dtype)
    db = _contract_lead(h, gs).astype(b.dtype)
    da = _contract_lead(gh, x).T.astype(a.dtype)
    dx = jnp.matmul(g, merged.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = _contract_lead(x, g).astype(dw_like[0].dtype) if dw_like else None
    return dx, dw, da, db


_merged.defvjp(_merged_fwd, _merged_bwd, symbolic_zeros=True)


def project(module: nnx.Module, name: str, x: jax.Array, w: jax.Array, n_in: int,
            base) -> jax.Array:
    """``base(x, w)`` (the product of ``module``'s parameter ``name``, kernel ``w [*in, *out]``
    with ``n_in`` input axes, with ``x [..., *in]``) plus its unmerged adapter's output.

    An adapter without active dropout (rate 0, or eval mode) over a float kernel of ``x``'s
    dtype (float32) goes into the same product: ``x @ (w + a @ b * scale)``, one product
    forward and one for the input gradient instead of three each plus the sums (the adapter's
    low-rank products stay for its own gradients), for at least ``MERGE_ROWS`` rows (training
    shapes; a decode step would rewrite every kernel per token). Otherwise as :func:`adapt`.
    Measured on the 270M LoRA r=16 step (6 layers, batch 4 x 512, CPU, same process, load
    ~6): 20.1 -> 19.5 CPU s per step, XLA temp 2,371 -> 2,141 MB."""
    table = getattr(module, "lora", None)
    adapter = None if table is None or name not in table else table[name]
    if adapter is None or adapter.merged:
        return base(x, w)
    drop = adapter.dropout
    lead, out_shape = x.shape[:x.ndim - n_in], w.shape[n_in:]
    if ((drop is not None and not drop.deterministic) or not isinstance(w, jax.Array)
            or w.dtype != x.dtype or x.dtype != jnp.float32 or math.prod(lead) < MERGE_ROWS):
        return adapt(module, name, x, base(x, w))
    r = adapter.rank
    k = math.prod(w.shape[:n_in])
    a = adapter.a[...].reshape(k, r).astype(x.dtype)
    b = adapter.b[...].reshape(r, -1).astype(x.dtype)
    y = _merged(x.reshape(-1, k), w.reshape(k, -1), a, b, adapter.scale)
    return y.reshape(*lead, *out_shape)


def adapt(module: nnx.Module, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """``y`` (the base product of ``module``'s parameter ``name`` with ``x``) plus its
    unmerged adapter's output, or ``y`` itself."""
    table = getattr(module, "lora", None)
    if table is None or name not in table:
        return y
    adapter = table[name]
    if adapter.merged:
        return y
    return y + adapter(x).astype(y.dtype)


def _targets(model: nnx.Module) -> Iterator[tuple[tuple[Any, ...], nnx.Module, str, int]]:
    for path, node in nnx.iter_graph(model):
        targets = getattr(type(node), "lora_targets", None)
        if isinstance(node, nnx.Module) and targets:
            for name, n_in in targets.items():
                yield tuple(path), node, name, n_in


def _path(path: tuple[Any, ...], name: str) -> str:
    return "/".join(map(str, (*path, name)))


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Attach an adapter to every projection whose parameter path ``config.targets`` matches
    (in place); returns those paths. Base parameters and their paths are unchanged."""
    pattern = re.compile(config.targets)
    chosen = [(path, node, name, n_in) for path, node, name, n_in in _targets(model)
              if pattern.search(_path(path, name))]
    if not chosen:
        examples = [_path(p, n) for p, _, n, _ in _targets(model)][:3]
        raise ValueError(f"LoRA targets {config.targets!r} match no projection of this model; "
                         f"its paths look like {examples}")
    done = []
    for path, node, name, n_in in chosen:
        table = node.lora
        if table is not None and name in table:
            raise ValueError(f"{_path(path, name)} already has a LoRA adapter; merge_lora or "
                             f"build the model again before applying another")
        adapter = LoRA(getattr(node, name), n_in, config, rngs=rngs)
        if table is None:
            node.lora = nnx.Dict({name: adapter})
        else:
            table[name] = adapter
        done.append(_path(path, name))
    return done


def adapters(model: nnx.Module) -> list[tuple[str, nnx.Module, str, LoRA]]:
    """``(path, module, parameter name, adapter)`` of every adapter in ``model``."""
    out = []
    for path, node, name, _ in _targets(model):
        table = node.lora
        if table is not None and name in table:
            out.append((_path(path, name), node, name, table[name]))
    return out


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every unmerged adapter into its kernel (in place); the forward then skips it."""
    for _, node, name, adapter in adapters(model):
        if not adapter.merged:
            kernel = getattr(node, name)
            w = kernel.get_value()
            kernel.set_value((w.astype(jnp.float32) + adapter.delta()).astype(w.dtype))
            adapter.merged = True
    return model


def unmerge_lora(model: nnx.Module) -> nnx.Module:
    """Take every merged adapter out of its kernel again (in place)."""
    for _, node, name, adapter in adapters(model):
        if adapter.merged:
            kernel = getattr(node, name)
            w = kernel.get_value()
            kernel.set_value((w.astype(jnp.float32) - adapter.delta()).astype(w.dtype))
            adapter.merged = False
    return model


# ---- what trains ------------------------------------------------------------------------------
_MODES = ("lora", "full", "frozen")
#: top-level attribute -> part, for models built of parts (the image-text model, SigLIP)
_PARTS = {"decoder": "decoder", "vision": "vision", "projector": "projector", "text": "text"}


def lora_filter(path: tuple[Any, ...], variable: Any) -> bool:
    """The adapters' parameters."""
    return isinstance(variable, nnx.LoRAParam)


def base_filter(path: tuple[Any, ...], variable: Any) -> bool:
    """Every parameter that is not an adapter's."""
    return isinstance(variable, nnx.Param) and not isinstance(variable, nnx.LoRAParam)


def trainable_filter(model: nnx.Module, *, decoder: str = "lora", vision: str = "frozen",
                     projector: str = "frozen", text: str = "frozen") -> Any:
    """An nnx filter (``(path, variable) -> bool``) of the parameters to train, per part:
    ``"lora"`` (its adapters only), ``"full"`` (all its parameters, adapters included) or
    ``"frozen"``. Parts are the model's ``decoder``, ``vision``, ``projector`` and ``text``
    (SigLIP's text tower) attributes; a model without them is one part: ``vision`` for a
    vision tower (a module whose class name starts with ``Vision``), else ``decoder``.

    A part set to ``"lora"`` without adapters, or a part the model lacks set to anything but
    ``"frozen"``, is an error (it would silently train nothing)."""
    modes = {"decoder": decoder, "vision": vision, "projector": projector, "text": text}
    for part, mode in modes.items():
        if mode not in _MODES:
            raise ValueError(f"{part}={mode!r}: choose one of {', '.join(_MODES)}")
    split = any(isinstance(getattr(model, a, None), nnx.Module) for a in _PARTS)
    whole = "vision" if type(model).__name__.startswith("Vision") else "decoder"

    def part_of(path: tuple[Any, ...]) -> str | None:
        if not split:
            return whole
        return _PARTS.get(str(path[0])) if path else None

    present: dict[str, set[str]] = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        part = part_of(tuple(path))
        if part is not None:
            present.setdefault(part, set()).add("lora" if lora_filter(path, variable) else "base")
    for part, mode in modes.items():
        if mode == "frozen":
            continue
        if part not in present:
            raise ValueError(f"{part}={mode!r} but this {type(model).__name__} has no {part}; "
                             f"leave it 'frozen'")
        if mode == "lora" and "lora" not in present[part]:
            raise ValueError(f"{part}='lora' but the {part} has no LoRA adapters: run "
                             f"apply_lora with targets that match it, or choose 'full'/'frozen'")

    def trainable(path: tuple[Any, ...], variable: Any) -> bool:
        if not isinstance(variable, nnx.Param):
            return False
        mode = modes.get(part_of(tuple(path)) or "", "frozen")
        if mode == "full":
            return True
        return mode == "lora" and isinstance(variable, nnx.LoRAParam)

    return trainable
