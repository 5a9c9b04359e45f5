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

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["LOGICAL_RULES", "MESH_AXES", "constrain", "logical_to_mesh", "make_mesh", "param",
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
    over ``devices`` (default: every JAX device). Missing axes are 1; one axis may be -1, the
    devices the others leave. The sizes must multiply to ``devices``."""
    n = jax.device_count() if devices is None else int(devices)
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


def tree_shardings(tree: Any, params: nnx.State, mesh: Mesh) -> Any:
    """Shardings for a pytree derived from ``params`` (e.g. an optax state whose moments
    mirror the parameters): a leaf whose key path ends with a parameter's path and has its
    shape gets that parameter's sharding; every other leaf is replicated."""
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
    for path, variable in nnx.to_flat_state(params):
        value = variable.get_value()
        key = tuple(str(p) for p in path)
        by_path[key] = (tuple(value.shape), NamedSharding(mesh, _spec_of(variable, mesh)))
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(key_path: Any, leaf: Any) -> NamedSharding:
        keys = tuple(_key_name(k) for k in key_path)
        shape = tuple(np.shape(leaf))
        for n in range(len(keys), 0, -1):
            hit = by_path.get(keys[-n:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)

