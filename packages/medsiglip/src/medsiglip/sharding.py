"""Logical axis names, the one rules table that maps them onto a device mesh, and the mesh.

Every parameter of medsiglip's and medgemma-core's models carries the logical names of its
axes as metadata (``out_sharding``, read by :func:`param_names`); code names logical axes,
never mesh axes (MaxText's ``logical_axis_rules``, Flax's ``nnx.with_partitioning``). One
table, :data:`LOGICAL_RULES`, maps each name onto the mesh axes ``data``, ``fsdp`` and
``tensor``::

    mesh = make_mesh("data=2,fsdp=2,tensor=2")     # -1 = the rest of the devices
    model = shard_model(model, mesh)               # every parameter placed by its names
    with jax.set_mesh(mesh):                       # activations constrained by name too
        loss = jax.jit(loss_fn)(model, batch)

Building a model never needs a mesh: parameters are created with ``eager_sharding=False``, so
the names are metadata only until :func:`shardings` / :func:`shard_model` apply them. The
activation constraints (:func:`constrain`) apply only while a mesh is set with
``jax.set_mesh``; without one they are the identity, so inference is unchanged.

A dimension whose size the mesh axes do not divide is sharded over the longest prefix of its
axes that does, else replicated (the 270M model's single kv head, a batch of 1); a mesh axis
already used by an earlier dimension of the same array is not used again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["LOGICAL_RULES", "MESH_AXES", "MemoryReport", "constrain", "memory_report", "logical_to_mesh", "make_mesh", "param",
           "param_names", "parse_mesh_shape", "shard_model", "shardings", "tree_shardings"]

#: The mesh axes, outermost first: data parallel, fully-sharded data parallel, tensor parallel.
MESH_AXES = ("data", "fsdp", "tensor")

#: Logical axis -> mesh axes (a name, a tuple of names, or None: replicated). The one table.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # ---- parameters: the Gemma 3 decoder and the projector's output
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    # ---- parameters: the SigLIP towers (both use the encoder's names) and the projector input
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),  # the heads * head_dim output of q/k/v (input of out_proj)
    ("vision_mlp", "tensor"),
    ("vision_patch", None),  # the patch kernel's p x p x C input
    ("vision_pos", None),  # rows of a position table
    # ---- LoRA adapters: the rank axis is small and replicated
    ("lora_rank", None),
    # ---- activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_patches", None),
)

_RULES = dict(LOGICAL_RULES)
Names = Sequence[str | None]


def param(value: Any, names: Names, **metadata: Any) -> nnx.Param:
    """``nnx.Param(value)`` whose axes are named ``names`` (one per dimension), without eager
    sharding: building the module needs no mesh."""
    names = tuple(names)
    if len(names) != len(np.shape(value)):
        raise ValueError(f"axis names {names} do not fit shape {tuple(np.shape(value))}")
    return nnx.Param(value, out_sharding=names, eager_sharding=False, **metadata)


def param_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names of a parameter (``out_sharding`` metadata), or None."""
    names = variable.get_metadata().get("out_sharding")
    return None if names is None else tuple(names)


def _axis_sizes(mesh: Mesh | Mapping[str, int] | Any) -> dict[str, int]:
    shape = mesh.shape if hasattr(mesh, "shape") else mesh
    return {str(k): int(v) for k, v in dict(shape).items()}


def logical_to_mesh(names: Names | None, mesh: Mesh | Mapping[str, int],
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """The ``PartitionSpec`` of an array whose axes are ``names`` on ``mesh`` (a ``Mesh``, an
    ``AbstractMesh`` or a mapping axis -> size), through :data:`LOGICAL_RULES`.

    With ``shape``, a dimension the mesh axes do not divide keeps the longest prefix of its
    axes that divides it (else it is replicated). Mesh axes of size 1 and axes the mesh lacks
    are left out; an axis already used by an earlier dimension is not used again."""
    if names is None:
        return PartitionSpec()
    sizes = _axis_sizes(mesh)
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in _RULES:
            raise KeyError(f"unknown logical axis {name!r}: add it to "
                           f"medsiglip.sharding.LOGICAL_RULES")
        rule = _RULES[name]
        axes = [rule] if isinstance(rule, str) else list(rule or ())
        axes = [a for a in axes if sizes.get(a, 1) > 1 and a not in used]
        if shape is not None:
            while axes and shape[i] % math.prod(sizes[a] for a in axes):
                axes.pop()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def parse_mesh_shape(spec: str | Mapping[str, int], devices: int | None = None
                     ) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` (or a mapping) -> ``{"data": 2, "fsdp": 2, "tensor": 2}``
    over ``devices``. Missing axes are 1; one axis may be -1, the devices the others leave
    (``devices`` defaults to every JAX device then). With ``devices``, the sizes must
    multiply to it; without (and no -1), any sizes go (a mesh planned for other machines)."""
    n = None if devices is None else int(devices)
    if isinstance(spec, str):
        parsed: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, eq, value = part.partition("=")
            key = key.strip()
            try:
                if not eq:
                    raise ValueError
                size = int(value)
            except ValueError:
                raise ValueError(f"mesh shape {spec!r}: {part!r} is not axis=size; write e.g. "
                                 f"'data=2,fsdp=2,tensor=2'") from None
            if key in parsed:
                raise ValueError(f"mesh shape {spec!r} names {key!r} twice")
            parsed[key] = size
    else:
        parsed = {str(k): int(v) for k, v in spec.items()}
    unknown = [k for k in parsed if k not in MESH_AXES]
    if unknown:
        raise ValueError(f"mesh shape {spec!r}: unknown axis {unknown[0]!r}; the axes are "
                         f"{', '.join(MESH_AXES)}")
    bad = [k for k, v in parsed.items() if v == 0 or v < -1]
    if bad:
        raise ValueError(f"mesh shape {spec!r}: {bad[0]}={parsed[bad[0]]}; sizes are positive "
                         f"or -1 (the rest of the devices)")
    rest = [k for k, v in parsed.items() if v == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh shape {spec!r}: only one axis may be -1")
    sizes = {a: parsed.get(a, 1) for a in MESH_AXES}
    known = math.prod(v for v in sizes.values() if v != -1)
    if n is None:
        if not rest:
            return sizes
        n = jax.device_count()
    if rest:
        if n % known:
            raise ValueError(f"mesh shape {spec!r}: {n} devices do not divide by {known}; "
                             f"choose sizes whose product divides {n}")
        sizes[rest[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise ValueError(f"mesh shape {spec!r} holds {math.prod(sizes.values())} devices but "
                         f"there are {n}; make the sizes multiply to {n} or use -1 for one axis")
    return sizes


def make_mesh(spec: str | Mapping[str, int] = "fsdp=-1",
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``(data, fsdp, tensor)`` from ``"data=2,fsdp=2,tensor=2"`` (-1 =
    the rest; see :func:`parse_mesh_shape`) over ``devices`` (default: all). Axes are
    ``AxisType.Auto`` (the compiler propagates shardings between the named constraints)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_shape(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def _spec_of(variable: nnx.Variable, mesh: Any) -> PartitionSpec:
    value = variable.get_value()
    return logical_to_mesh(param_names(variable), mesh, tuple(value.shape))


def shardings(state: nnx.State | nnx.Module, mesh: Mesh) -> nnx.State:
    """The ``NamedSharding`` of every variable of ``state`` (an ``nnx.State``, abstract or
    not, or a module) on ``mesh``, as an ``nnx.State`` of the same structure; variables
    without names are replicated. Use it as ``jax.jit``'s in/out shardings."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state)

    def one(variable: nnx.Variable) -> nnx.Variable:
        return variable.replace(value=NamedSharding(mesh, _spec_of(variable, mesh)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every variable of ``model`` on ``mesh`` by its logical names (in place, one array
    at a time); returns ``model``."""
    state = nnx.state(model)
    for _, variable in nnx.to_flat_state(state):
        sharding = NamedSharding(mesh, _spec_of(variable, mesh))
        variable.set_value(jax.device_put(variable.get_value(), sharding))
    nnx.update(model, state)
    return model


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """``x`` constrained to the sharding its axis ``names`` give on the mesh set with
    ``jax.set_mesh``; ``x`` itself when no mesh is set (inference, one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_mesh(names, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def _param_specs(params: nnx.State, mesh: Any
                 ) -> dict[tuple[str, ...], tuple[tuple[int, ...], PartitionSpec]]:
    out = {}
    for path, variable in nnx.to_flat_state(params):
        out[tuple(str(p) for p in path)] = (tuple(variable.get_value().shape),
                                            _spec_of(variable, mesh))
    return out


def _match_specs(tree: Any, table: Mapping[tuple[str, ...], tuple[tuple[int, ...], PartitionSpec]]
                 ) -> Any:
    """A spec per leaf of ``tree``: the spec of the parameter whose path ends its key path
    (with the same shape), else replicated."""

    def one(key_path: Any, leaf: Any) -> PartitionSpec:
        keys = tuple(_key_name(k) for k in key_path)
        shape = tuple(np.shape(leaf))
        for start in range(len(keys)):
            for end in (len(keys), len(keys) - 1):  # a trailing .value of a Variable
                hit = table.get(keys[start:end])
                if hit is not None and hit[0] == shape:
                    return hit[1]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(one, tree)


def tree_shardings(tree: Any, params: nnx.State, mesh: Mesh) -> Any:
    """Shardings for a pytree derived from ``params`` (e.g. an optax state whose moments
    mirror the parameters): a leaf whose key path ends with a parameter's path and has its
    shape gets that parameter's sharding; every other leaf (a step count) is replicated."""
    specs = _match_specs(tree, _param_specs(params, mesh))
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


# ---- memory --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of a model's training state on a mesh (from shapes only): the
    parameters, their gradients and the optimizer state (both over the trainable ones)."""

    mesh: tuple[tuple[str, int], ...]
    optimizer: str
    param_count: int
    trainable_count: int
    param_bytes: int
    param_bytes_per_device: int
    grad_bytes_per_device: int
    optimizer_bytes: int
    optimizer_bytes_per_device: int
    replicated: tuple[str, ...]  # parameters this mesh cannot shard (over 1 MiB), by path

    @property
    def devices(self) -> int:
        return math.prod(n for _, n in self.mesh)

    @property
    def total_bytes_per_device(self) -> int:
        return (self.param_bytes_per_device + self.grad_bytes_per_device
                + self.optimizer_bytes_per_device)

    def __str__(self) -> str:
        def gib(n: int) -> str:
            return f"{n / (1 << 30):10.2f} GiB"

        mesh = ",".join(f"{a}={n}" for a, n in self.mesh)
        lines = [
            f"mesh {mesh} ({self.devices} devices), optimizer {self.optimizer}",
            f"{'':14}{'total':>14}{'per device':>16}",
            f"  parameters  {gib(self.param_bytes)}  {gib(self.param_bytes_per_device)}"
            f"   {self.param_count / 1e9:.3f} B, {self.trainable_count / 1e9:.3f} B trainable",
            f"  gradients   {'':14}  {gib(self.grad_bytes_per_device)}",
            f"  optimizer   {gib(self.optimizer_bytes)}  {gib(self.optimizer_bytes_per_device)}",
            f"  sum         {'':14}  {gib(self.total_bytes_per_device)}"
            f"   activations not included",
        ]
        if self.replicated:
            lines.append(f"  replicated: {len(self.replicated)} parameter(s) over 1 MiB this "
                         f"mesh cannot shard, e.g. {self.replicated[0]}")
        return "\n".join(lines)


def _optimizer(optimizer: Any) -> tuple[str, Any]:
    import optax

    if not isinstance(optimizer, str):
        return type(optimizer).__name__, optimizer
    makers = {"adamw": lambda: optax.adamw(1e-4), "adam": lambda: optax.adam(1e-4),
              "sgd": lambda: optax.sgd(1e-4), "none": lambda: optax.identity()}
    if optimizer not in makers:
        raise ValueError(f"optimizer={optimizer!r}: choose one of {', '.join(makers)} or pass "
                         f"an optax GradientTransformation")
    return optimizer, makers[optimizer]()


def _per_device(leaf: Any, spec: PartitionSpec, sizes: Mapping[str, int]) -> tuple[int, int]:
    nbytes = int(np.prod(np.shape(leaf), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    shards = 1
    for axes in spec:
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            shards *= sizes[axis]
    return nbytes, nbytes // shards


def memory_report(model: nnx.Module | Callable[[Any], nnx.Module],
                  mesh_shape: str | Mapping[str, int] | Mesh, *, optimizer: Any = "adamw",
                  trainable: Any = nnx.Param, devices: int | None = None) -> MemoryReport:
    """Per-device parameter, gradient and optimizer bytes of ``model`` on a mesh, computed
    with ``jax.eval_shape`` (no memory, no devices needed).

    ``model``: a module (abstract or not) or ``build(rngs) -> module`` (built abstract, see
    :func:`medsiglip.weights.abstract_module`). ``mesh_shape``: ``"fsdp=8"``-style (``-1``
    takes ``devices``, default every JAX device), a mapping or a ``Mesh``. ``optimizer``:
    ``"adamw"``, ``"adam"``, ``"sgd"``, ``"none"`` or an optax transformation, whose state
    (over the ``trainable`` parameters, an nnx filter) is sharded like the parameters."""
    from medsiglip.weights import abstract_module

    if not isinstance(model, nnx.Module):
        model = abstract_module(model)
    if hasattr(mesh_shape, "shape") and not isinstance(mesh_shape, Mapping):
        sizes = _axis_sizes(mesh_shape)
    else:
        sizes = parse_mesh_shape(mesh_shape, devices)
    name, tx = _optimizer(optimizer)
    params = nnx.state(model, nnx.Param)
    train = nnx.state(model, nnx.All(nnx.Param, trainable))
    table = _param_specs(params, sizes)
    total = per_device = count = 0
    replicated = []
    for path, variable in nnx.to_flat_state(params):
        key = tuple(str(p) for p in path)
        shape, spec = table[key]
        nbytes, mine = _per_device(variable.get_value(), spec, sizes)
        total, per_device, count = total + nbytes, per_device + mine, count + math.prod(shape)
        if mine == nbytes and nbytes > (1 << 20) and math.prod(sizes.values()) > 1:
            replicated.append("/".join(key))
    grads = 0
    train_count = 0
    for path, variable in nnx.to_flat_state(train):
        shape, spec = table[tuple(str(p) for p in path)]
        grads += _per_device(variable.get_value(), spec, sizes)[1]
        train_count += math.prod(shape)
    pure = nnx.to_pure_dict(train)
    opt_state = jax.eval_shape(tx.init, pure)
    specs = _match_specs(opt_state, table)
    opt_total = opt_mine = 0
    for leaf, spec in zip(jax.tree.leaves(opt_state),
                          jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
                          strict=True):
        nbytes, mine = _per_device(leaf, spec, sizes)
        opt_total, opt_mine = opt_total + nbytes, opt_mine + mine
    return MemoryReport(tuple(sizes.items()), name, count, train_count, total, per_device, grads,
                        opt_total, opt_mine, tuple(replicated))
