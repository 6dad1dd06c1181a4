"""The device mesh: four named axes, tensor innermost.

Axis order is ``("data", "pipeline", "expert", "tensor")``. With the tensor axis
innermost, a tensor-parallel group is made of neighbouring device ids (on real
hardware the fastest links), and it is nested inside each data-parallel replica.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA, PIPELINE, EXPERT, TENSOR = "data", "pipeline", "expert", "tensor"
AXES = (DATA, PIPELINE, EXPERT, TENSOR)


def make_mesh(
    data: int = 1,
    pipeline: int = 1,
    expert: int = 1,
    tensor: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Returns a Mesh over ``devices`` (default: all) with the four named axes.

    One size may be -1; it is inferred from the device count. Axes use
    ``AxisType.Auto`` so that plain ``jax.jit`` code (GSPMD) handles the axes a
    layer does not drive by hand.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(zip(AXES, (data, pipeline, expert, tensor)))
    inferred = [name for name, size in sizes.items() if size == -1]
    if len(inferred) > 1:
        raise ValueError(
            f"Only one mesh axis may be -1 (inferred), but {inferred} are; "
            f"give explicit sizes whose product is {len(devices)}."
        )
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(
                f"Mesh axis {name!r} has size {size}; sizes must be positive "
                f"(or -1 for one inferred axis)."
            )
    known = math.prod(size for size in sizes.values() if size != -1)
    if inferred:
        if len(devices) % known:
            raise ValueError(
                f"Cannot infer mesh axis {inferred[0]!r}: the other axes multiply "
                f"to {known}, which does not divide the {len(devices)} devices."
            )
        sizes[inferred[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        shape = " x ".join(f"{n}={s}" for n, s in sizes.items())
        raise ValueError(
            f"Mesh {shape} needs {total} devices but {len(devices)} are "
            f"available; choose sizes whose product is {len(devices)}."
        )
    grid = np.array(devices, dtype=object).reshape(tuple(sizes.values()))
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def make_mesh_for(sizes: dict[str, int]) -> Mesh:
    """``make_mesh(**sizes)``; on CPU (fake devices) using only as many devices
    as the sizes multiply to, so one process can hold several meshes.

    ``sizes["spares"]`` (optional) devices are kept out of the mesh: the mesh
    takes the first devices, the spares are the next ones (``fault/spare.py``).
    """
    sizes = dict(sizes)
    spares, devices = sizes.pop("spares", 0), jax.devices()
    in_mesh = math.prod(size for size in sizes.values() if size != -1)  # at least
    if spares and len(devices) < in_mesh + spares:
        raise ValueError(
            f"'mesh.spares' ({spares}) needs {spares} devices beyond the mesh's "
            f"{in_mesh}, but only {len(devices)} exist; lower mesh.spares or the mesh sizes."
        )
    devices = devices[: len(devices) - spares]
    if devices[0].platform == "cpu" and -1 not in sizes.values():
        devices = devices[: math.prod(sizes.values())]
    return make_mesh(**sizes, devices=devices)


BF16_CPU_FLAG = "--xla_disable_hlo_passes=all-reduce-promotion"
"""XLA's CPU pass that widens bfloat16 all-reduces to float32 aborts the process
(``Invalid binary instruction opcode copy``) on one inside a shard_map that
leaves some mesh axes automatic, as the model's region does with axes of size
1. Without the pass the CPU runtime sums bfloat16 directly, correctly
(tests/test_mixed_precision.py). Read when jax initialises its backends."""


def allow_bf16_cpu_all_reduce() -> None:
    """Adds ``BF16_CPU_FLAG`` to ``XLA_FLAGS`` (before jax initialises; CPU runs only)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if BF16_CPU_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {BF16_CPU_FLAG}".strip()


def provide_cpu_devices(count: int) -> None:
    """Makes jax expose ``count`` CPU devices (fake ones on a single host).

    Must run before jax initialises its backends (before the first jax
    operation). Raises RuntimeError when jax already runs with fewer devices.
    """
    from jax._src import xla_bridge  # the only reliable "already initialised?" probe

    if xla_bridge.backends_are_initialized():
        available = len(jax.devices())
        if available < count:
            raise RuntimeError(
                f"{count} devices were requested but jax is already initialised "
                f"with {available}; call provide_cpu_devices({count}) (or set "
                f"JAX_NUM_CPU_DEVICES={count}) before the first jax operation."
            )
        return
    allow_bf16_cpu_all_reduce()
    jax.config.update("jax_num_cpu_devices", max(count, jax.config.jax_num_cpu_devices))
