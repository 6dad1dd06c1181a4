"""Mesh construction: the axes of ``core.axes`` laid over devices, tensor innermost.

With "tensor" innermost, a tensor-parallel group is made of neighbouring
device ids (on real hardware the fastest links), nested inside each
data-parallel replica. Over several processes (one per host or GPU) the axes
are laid out hybrid-style: "tensor" (then the next axes outwards) inside a
process as far as its devices go, the rest across processes, so
tensor-parallel traffic stays on a host's fast links.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from lite_tp_jax.core.axes import AXES, resolve_sizes
from lite_tp_jax.core.errors import BadInput


def make_mesh(
    sizes: Mapping[str, int] | None = None, /, *, devices: Sequence[jax.Device] | None = None, **axis_sizes: int
) -> Mesh:
    """A Mesh over ``devices`` with every axis of ``AXES``.

    Sizes come as a mapping (``make_mesh({"tensor": 4})``) or as keywords
    (``make_mesh(data=2, tensor=4)``); missing axes are 1, one may be -1
    (inferred from the device count). ``devices`` defaults to the first N
    devices of this process when the sizes fix N (``make_mesh(tensor=4)`` with
    8 devices: devices 0-3), else to all of them; a run of several processes
    always spans every device. Axes use ``AxisType.Auto`` so that plain
    ``jax.jit`` code (GSPMD) handles the axes a layer does not drive by hand.
    """
    requested = {**(sizes or {}), **axis_sizes}
    if devices is None:
        devices = jax.devices()
        wanted = math.prod(requested.values())
        if jax.process_count() == 1 and -1 not in requested.values() and 0 < wanted < len(devices):
            devices = devices[:wanted]
    devices = list(devices)
    shape = resolve_sizes(requested, len(devices))
    total = math.prod(shape.values())
    if total != len(devices):
        layout = " x ".join(f"{n}={s}" for n, s in shape.items())
        raise BadInput(
            f"Mesh {layout} needs {total} devices but {len(devices)} are "
            f"available; choose sizes whose product is {len(devices)}."
        )
    return Mesh(device_grid(tuple(shape.values()), devices), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def device_grid(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
    """``devices`` arranged as ``shape`` (one size per axis of ``AXES``).

    Devices of one process: ``jax.make_mesh``'s topology-aware order (on CPU,
    device-id order). Devices of several processes: the hybrid layout of
    ``mesh_utils.create_hybrid_device_mesh``, with ``split_over_processes``.
    """
    processes = {d.process_index for d in devices}
    if len(processes) == 1:
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices).devices
    counts = {p: sum(d.process_index == p for d in devices) for p in processes}
    if len(set(counts.values())) > 1:
        raise BadInput(
            f"The mesh's devices come from processes holding different numbers of them "
            f"({counts}); give every process the same number of devices."
        )
    inner, outer = split_over_processes(shape, len(devices) // len(processes))
    return mesh_utils.create_hybrid_device_mesh(inner, outer, devices, process_is_granule=True)


def split_over_processes(shape: tuple[int, ...], per_process: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inside a process, across processes) sizes of each axis, their products
    ``shape``: the innermost axes ("tensor" first) take a process's devices."""
    inner, left = [1] * len(shape), per_process
    for i in reversed(range(len(shape))):
        inner[i] = math.gcd(shape[i], left)
        left //= inner[i]
    if left != 1:
        layout = " x ".join(f"{n}={s}" for n, s in zip(AXES, shape))
        raise BadInput(
            f"Mesh {layout} cannot be laid over processes of {per_process} devices each: the "
            f"innermost axes must fill a process exactly; choose axis sizes whose inner "
            f"part multiplies to {per_process}."
        )
    return tuple(inner), tuple(s // i for s, i in zip(shape, inner))


def make_mesh_for(sizes: Mapping[str, int], *, spares: int = 0) -> Mesh:
    """``make_mesh(sizes)``; on CPU (fake devices) using only as many devices
    as the sizes multiply to, so one process can hold several meshes.

    ``spares`` devices are kept out of the mesh: the mesh takes the first
    devices, the spares are the next ones (``runtime/spares.py``).
    """
    devices = jax.devices()
    in_mesh = math.prod(size for size in sizes.values() if size != -1)  # at least
    if spares and len(devices) < in_mesh + spares:
        raise BadInput(
            f"'mesh.spares' ({spares}) needs {spares} devices beyond the mesh's "
            f"{in_mesh}, but only {len(devices)} exist; lower mesh.spares or the mesh sizes."
        )
    devices = devices[: len(devices) - spares]
    if devices[0].platform == "cpu" and jax.process_count() == 1 and -1 not in sizes.values():
        devices = devices[: math.prod(sizes.values())]
    return make_mesh(sizes, devices=devices)
