"""Device mesh from the config: axes ("data", "fsdp", "tensor"); one -1 fills the rest.

One SPMD code path serves 1 CPU device, 8 fake CPU devices in tests, a GPU host and a TPU
pod slice: only the mesh shape changes. Axis types are Auto (GSPMD propagation from the
shardings given to `jax.jit`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces a single -1 by what is left of `num_devices`; checks the product."""
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1:
        raise ValueError(f"Mesh shape {shape} has more than one -1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"Mesh shape {shape} does not divide {num_devices} devices.")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"Mesh shape {shape} needs {math.prod(shape)} devices; {num_devices} are available.")
    return shape


def make_mesh(shape: Sequence[int] = (1, -1, 1), axis_names: Sequence[str] = AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the given shape, e.g. (1, -1, 1) = pure FSDP."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_shape(shape, len(devices))
    if len(shape) != len(axis_names):
        raise ValueError(f"Mesh shape {shape} and axis names {tuple(axis_names)} differ in length.")
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape))
    return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names),
                axis_types=(AxisType.Auto,) * len(shape))


def split_mesh(shape: Sequence[int], first: int, devices: Sequence[jax.Device] | None = None,
               axis_names: Sequence[str] = AXES) -> tuple[Mesh, Mesh]:
    """Two meshes of `shape` (its -1 filled for each part): the first `first` of `devices`
    (default: all) and the rest, e.g. 8 devices, (1, -1, 1), first=4: two (1, 4, 1) meshes."""
    devices = list(devices if devices is not None else jax.devices())
    if not 0 < first < len(devices):
        raise ValueError(f"Cannot split {len(devices)} devices into the first {first} and the rest.")
    return (make_mesh(shape, axis_names, devices[:first]), make_mesh(shape, axis_names, devices[first:]))
