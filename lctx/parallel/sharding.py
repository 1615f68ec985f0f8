"""Logical axis names -> mesh axes: one table of rules for parameters and activations.

Model code names what each array dimension *is* (batch, length, embed, heads, ...);
`LOGICAL_RULES` says which mesh axes shard it (the EasyLM / MaxText scheme). One
table serves parameters and activations because an axis is used at most once per
array: in an activation `[batch, length, embed]`, batch takes ("data", "fsdp") and
length takes "sequence", so embed's ("fsdp", "sequence") are already taken and it
stays whole; in a weight `[embed, heads, head_dim]` nothing else uses them, so the
weight is sharded FSDP-style over every device that is not a tensor-parallel peer
(ZeRO-3: each layer's weights are all-gathered just before use).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lctx import compat

MeshAxes = Union[str, tuple[str, ...], None]
Rules = Sequence[tuple[str, MeshAxes]]

LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    # Parameters: FSDP over fsdp and sequence (sequence-parallel devices would
    # otherwise each hold a full replica). Activations: already taken, see above.
    ("embed", ("fsdp", "sequence")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),  # the stacked-layer axis of scanned parameters
)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh, *,
                    shape: Sequence[int] | None = None) -> P:
    """The PartitionSpec for an array whose dimensions have logical `names`.

    Mesh axes that the mesh lacks, or that an earlier dimension already uses, are
    dropped. With `shape`, a dimension keeps only the leading mesh axes whose
    product divides its size (e.g. 4 heads on an 8-way tensor axis stay whole)
    rather than failing to place. A name without a rule (or None) is unsharded.
    """
    table = dict(rules)
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, name in enumerate(names):
        axes = [a for a in _as_tuple(table.get(name)) if a in mesh.shape and a not in used]
        if shape is not None:
            while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*spec)


def dim_shards(names: Sequence[str | None], shape: Sequence[int], dim: int, mesh: Mesh | None,
               rules: Rules = LOGICAL_RULES) -> int:
    """How many ways dimension `dim` of an array with logical `names` and `shape` is split.

    1 without a mesh.
    """
    if mesh is None:
        return 1
    entry = logical_to_spec(names, rules, mesh, shape=shape)[dim]
    return math.prod(mesh.shape[a] for a in _as_tuple(entry))


def constrain_logical(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None,
                      rules: Rules = LOGICAL_RULES) -> jax.Array:
    """Constrains activation `x` to the sharding of its logical `names`; no-op without a mesh."""
    if mesh is None:
        return x
    return compat.constrain(x, mesh, logical_to_spec(names, rules, mesh, shape=x.shape))


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def param_shardings(params_or_abstract: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """NamedShardings for a tree of parameters (or any state built from them).

    Leaves boxed in `nn.LogicallyPartitioned` (from `nn.with_logical_partitioning`,
    e.g. `jax.eval_shape` of a Flax init, or an optax state initialised from such a
    tree) are sharded by their logical names; other leaves (step counters, scalars)
    are replicated. The result has the structure of the unboxed tree.
    """

    def sharding(leaf: Any) -> NamedSharding:
        if _is_box(leaf):
            spec = logical_to_spec(leaf.names, rules, mesh, shape=leaf.value.shape)
        else:
            spec = P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(sharding, params_or_abstract, is_leaf=_is_box)
