"""Version-sensitive JAX imports and helpers, kept in one place.

lctx is written against the public API of JAX >= 0.7 (`jax.shard_map`,
`jax.sharding.AxisType`, `jax.sharding.reshard`); TPU users often run a newer JAX
than this repository's CPU CI, so anything that moved between versions lives here.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

try:  # JAX >= 0.6: public shard_map with `check_vma`.
    _shard_map = jax.shard_map
    _CHECK_KWARG = "check_vma"
except AttributeError:  # pragma: no cover - older JAX
    from jax.experimental.shard_map import shard_map as _shard_map

    _CHECK_KWARG = "check_rep"

from jax.sharding import AxisType


def shard_map(fn, *, mesh: Mesh, in_specs, out_specs, check: bool = False):
    """`jax.shard_map` with the replication check off by default.

    The kernels mix collectives (ppermute, all_to_all) with custom_vjp rules whose
    varying-axis annotations the checker cannot always infer; outputs are exact
    shards by construction and tests compare them with a dense reference.
    """
    return _shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **{_CHECK_KWARG: check})


def is_explicit(mesh: Mesh) -> bool:
    """True when any axis of `mesh` has Explicit axis type (sharding in the type)."""
    return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def constrain(x: jax.Array, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """Places `x` with `spec` on `mesh`, inside or outside jit, for Auto or Explicit axes.

    Explicit meshes carry sharding in the array type, so a change needs `reshard`;
    Auto meshes take a sharding constraint (a no-op hint when already placed).
    """
    sharding = NamedSharding(mesh, spec)
    if is_explicit(mesh):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def mesh_context() -> bool:
    """True inside `jax.set_mesh(...)` or a `shard_map` body (an abstract mesh is set)."""
    return not jax.sharding.get_abstract_mesh().empty


def in_shard_map() -> bool:
    """True while tracing the body of a `shard_map` (some mesh axis is Manual)."""
    return bool(jax.sharding.get_abstract_mesh().manual_axes)


def tpu_interpret_context(interpret: bool):
    """The context a TPU Pallas kernel is traced under to run in interpret mode on a CPU.

    One device: `pltpu.force_tpu_interpret_mode()`, which simulates TPU memory and
    checks out-of-bounds reads. Inside `shard_map` that mode deadlocks on a CPU: each
    device's kernel runs as a chain of io_callbacks on XLA's intra-op threads, and a
    callback whose argument is over 100 KiB (XLA CPU's `kSmallDataTransferByteSize`,
    above which host-to-device copies become asynchronous) waits for a copy that no
    thread is left to run once every device sits in such a callback (measured: a
    98,304-byte q block finishes, 106,496 bytes hangs). There the kernel runs under
    plain `interpret=True`: Pallas's HLO interpreter, a scan over the grid in ordinary
    XLA ops with no callbacks. Returns (context manager, the `interpret` argument
    for `pallas_call`).
    """
    if not interpret:
        return contextlib.nullcontext(), False
    if in_shard_map():
        return contextlib.nullcontext(), True
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.force_tpu_interpret_mode(), False


def typed_on_mesh(x) -> bool:
    """True when `x` is a JAX array whose type carries a sharding over some mesh's axes
    (Explicit axes)."""
    return isinstance(x, jax.Array) and not jax.typeof(x).sharding.mesh.empty


def with_auto_axes(mesh: Mesh) -> Mesh:
    """`mesh` with every axis Auto: same devices and names, sharding out of the types."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
