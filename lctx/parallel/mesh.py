"""`make_mesh`: the project's only mesh constructor.

Axes are always ("data", "fsdp", "sequence", "tensor"), in that order, so every
PartitionSpec in lctx can name them whether or not they are larger than 1. Axis
types are passed explicitly: `jax.make_mesh` defaults to Explicit axes in JAX 0.10
(sharding in the array type), `Mesh(...)` to Auto; lctx defaults to Auto, where
sharding constraints guide the compiler (GSPMD / Shardy) and collectives are inferred.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh

from lctx.compat import AxisType

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "sequence", "tensor")


def mesh_shape(sizes: dict[str, int], device_count: int) -> tuple[int, ...]:
    """Resolves one -1 entry of `sizes` (axis -> size) to fill `device_count`.

    Returns the sizes in MESH_AXES order. Raises ValueError naming the sizes when
    they are not positive, have more than one -1, or do not multiply to the count.
    """
    described = ", ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
    bad = [a for a in MESH_AXES if not isinstance(sizes[a], int) or sizes[a] == 0 or sizes[a] < -1]
    if bad:
        raise ValueError(f"mesh {described}: sizes must be positive ints or -1 (fill); "
                         f"bad: {', '.join(bad)}")
    fill = [a for a in MESH_AXES if sizes[a] == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh {described}: at most one axis may be -1 (fill the remaining "
                         "devices)")
    fixed = math.prod(sizes[a] for a in MESH_AXES if sizes[a] != -1)
    if fill:
        if device_count % fixed:
            raise ValueError(f"mesh {described}: the other axes' product {fixed} must divide the "
                             f"device count {device_count} for {fill[0]}=-1 to fill it")
        sizes = {**sizes, fill[0]: device_count // fixed}
    elif fixed != device_count:
        raise ValueError(f"mesh {described}: the product {fixed} must equal the device count "
                         f"{device_count} (or set one axis to -1 to fill)")
    return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(data: int = 1, fsdp: int = 1, sequence: int = 1, tensor: int = 1, *,
              axis_types: AxisType | Sequence[AxisType] = AxisType.Auto,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "sequence", "tensor").

    Args:
      data, fsdp, sequence, tensor: axis sizes; one of them may be -1 to take the
        remaining devices. Their product must equal the number of devices.
      axis_types: one AxisType for every axis (default Auto) or one per axis.
      devices: the devices to lay out (default `jax.devices()`); `jax.make_mesh`
        orders them for the physical topology (ICI rings on TPU).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(dict(data=data, fsdp=fsdp, sequence=sequence, tensor=tensor), len(devices))
    if isinstance(axis_types, AxisType):
        types = (axis_types,) * len(MESH_AXES)
    else:
        types = tuple(axis_types)
        if len(types) != len(MESH_AXES) or not all(isinstance(t, AxisType) for t in types):
            raise ValueError(f"axis_types={axis_types!r}: expected one AxisType or "
                             f"{len(MESH_AXES)} of them, one per axis {MESH_AXES}")
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
