"""The device mesh: four named axes, tensor innermost.

Axis order is ``("data", "pipeline", "expert", "tensor")``. With the tensor axis
innermost, a tensor-parallel group is made of neighbouring device ids (on real
hardware the fastest links), and it is nested inside each data-parallel replica.

Several processes (one per host or GPU; ``lite-tp launch`` on one machine)
form one mesh: ``start_cluster`` joins them through ``jax.distributed``, and
``make_mesh`` then lays the axes out hybrid-style: "tensor" (then "expert",
"pipeline", "data") inside a process as far as its devices go, the rest across
processes, so tensor-parallel traffic stays on a host's fast links.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
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
    return Mesh(device_grid(tuple(sizes.values()), devices), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def device_grid(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
    """``devices`` arranged as ``shape`` (data, pipeline, expert, tensor).

    Devices of one process: ``jax.make_mesh``'s topology-aware order (on CPU,
    device-id order). Devices of several processes: the hybrid layout of
    ``mesh_utils.create_hybrid_device_mesh``, with ``split_over_processes``.
    """
    processes = {d.process_index for d in devices}
    if len(processes) == 1:
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices).devices
    counts = {p: sum(d.process_index == p for d in devices) for p in processes}
    if len(set(counts.values())) > 1:
        raise ValueError(
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
        raise ValueError(
            f"Mesh {layout} cannot be laid over processes of {per_process} devices each: the "
            f"innermost axes must fill a process exactly; choose axis sizes whose inner "
            f"part multiplies to {per_process}."
        )
    return tuple(inner), tuple(s // i for s, i in zip(shape, inner))


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
    if devices[0].platform == "cpu" and jax.process_count() == 1 and -1 not in sizes.values():
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


# --- several processes ------------------------------------------------------------

LAUNCH_ENV = ("LITE_TP_COORDINATOR", "LITE_TP_NUM_PROCESSES", "LITE_TP_PROCESS_ID")
"""Set by ``lite-tp launch`` for each process it starts (see ``launch.py``)."""


def cluster_in_environment() -> bool:
    """True when this process is one of several: started by ``lite-tp launch``,
    given ``JAX_COORDINATOR_ADDRESS``, or run as one of several SLURM tasks or
    Open MPI ranks (which ``jax.distributed.initialize()`` detects itself)."""
    env = os.environ
    return (
        all(name in env for name in LAUNCH_ENV)
        or "JAX_COORDINATOR_ADDRESS" in env
        or (int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env)
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )


def start_cluster() -> bool:
    """Joins the other processes of the run with ``jax.distributed.initialize``
    when ``cluster_in_environment()``; returns whether it did. Must run before
    the first jax operation."""
    if not cluster_in_environment():
        return False
    env = os.environ
    if all(name in env for name in LAUNCH_ENV):
        jax.distributed.initialize(
            env["LITE_TP_COORDINATOR"], int(env["LITE_TP_NUM_PROCESSES"]), int(env["LITE_TP_PROCESS_ID"])
        )
    else:
        jax.distributed.initialize()  # SLURM, Open MPI, JAX_COORDINATOR_ADDRESS: detected by JAX
    return True
