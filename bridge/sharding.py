"""Logical axis names -> mesh shardings (MaxText-style rules held in the config).

Every parameter carries logical names in its `axes` metadata (e.g. ("embed", "mlp")); the
rules map each name to mesh axes. A mesh axis is used at most once per array, and a rule
whose mesh axes do not divide the dimension falls back to replication for that dimension,
so odd head counts and vocabularies still shard.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),  # the stacked-blocks axis of scan_layers models
)


def as_rules(rules) -> tuple:
    """Rules as hashable tuples (configs and JSON give lists)."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)


def logical_to_spec(axes: Sequence[str | None], rules=DEFAULT_RULES, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for an array with the given logical axes (and, with shape+mesh, divisibility)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise ValueError(f"Logical axis {name!r} has no sharding rule; rules cover {sorted(table)}.")
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and (mesh is None or a in mesh.shape))
        if shape is not None and mesh is not None:
            while mesh_axes and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
                mesh_axes = mesh_axes[:-1]
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def param_sharding(var: nnx.Variable, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    axes = var.get_metadata().get("axes")
    if axes is None:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_spec(axes, rules or DEFAULT_RULES, var.shape, mesh))


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """Pytree of NamedSharding matching an `nnx.State` (params by their axes, the rest replicated)."""
    def one(x):
        if isinstance(x, nnx.Variable):
            return x.replace(param_sharding(x, mesh, rules))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state, mesh: Mesh, rules=DEFAULT_RULES):
    """Places an `nnx.State` on the mesh by its logical axes."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def split_rows(tree, k: int):
    """Arrays [R, ...] -> [k, R / k, ...]: slice m holds rows m, m + k, m + 2k, ... With rows
    sharded in contiguous blocks over devices, every device keeps its share of every slice,
    so looping over slices moves no data."""
    rows = jax.tree.leaves(tree)[0].shape[0]
    if rows % k:
        raise ValueError(f"{rows} rows do not split into {k} micro-batches.")
    return jax.tree.map(lambda x: x.reshape(rows // k, k, *x.shape[1:]).swapaxes(0, 1), tree)


def join_rows(tree):
    """Inverse of `split_rows`: [k, R / k, ...] -> [R, ...] in the original row order."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of a [B, ...] batch array: B over the rule for "batch", the rest replicated
    (with `shape`, mesh axes that do not divide B are dropped)."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, shape, mesh))


_ACTIVE_RULES: contextvars.ContextVar = contextvars.ContextVar("bridge_sharding_rules", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=DEFAULT_RULES):
    """`jax.set_mesh(mesh)` plus the logical-axis rules `constrain` maps activations with.

    Trace jitted steps inside it. A jitted function's cache does not see the rules, so one
    process should keep to one set of rules per mesh (as a run does)."""
    token = _ACTIVE_RULES.set(tuple(rules or DEFAULT_RULES))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _ACTIVE_RULES.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pins an activation's sharding by logical axes under the current mesh (no-op without
    one). Without it, propagation from FSDP-sharded weights can shard activations along the
    hidden dimension and keep every row on every device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, _ACTIVE_RULES.get() or DEFAULT_RULES, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
