"""The devices of this process: fake CPU devices, or a place in a cluster.

Everything here runs before jax initialises its backends (before the first jax
operation), because that is when XLA reads its flags and device count:

* ``start_cluster`` joins the other processes of a run through
  ``jax.distributed`` (``lite-tp launch``, SLURM, Open MPI, or
  ``JAX_COORDINATOR_ADDRESS``);
* ``provide_cpu_devices`` otherwise makes jax expose the mesh's devices as fake
  CPU devices, after ``check_fake_device_count`` has refused an implausible
  count (``mesh.tensor=100000``, a typo, would grow memory without bound);
* ``use_deterministic_gpu_ops`` and ``allow_bf16_cpu_all_reduce`` set XLA flags;
* ``check_fits_memory`` refuses, before any work, what a device cannot hold
  (after jax has started: it asks the devices).
"""

from __future__ import annotations

import os

import jax
from jax._src import xla_bridge  # the only reliable "already initialised?" probe

from lite_tp_jax.core.errors import BadInput
from lite_tp_jax.runtime.launch import LAUNCH_ENV

MAX_FAKE_DEVICES_ENV = "LITE_TP_MAX_FAKE_DEVICES"


class PreflightError(BadInput):
    """The machine or the file system cannot run this config."""


def max_fake_devices() -> int:
    """The plausible number of fake CPU devices on this machine: 64 per core
    (at least 512), or ``$LITE_TP_MAX_FAKE_DEVICES``."""
    override = os.environ.get(MAX_FAKE_DEVICES_ENV)
    if override is not None:
        try:
            return int(override)
        except ValueError:
            raise PreflightError(f"{MAX_FAKE_DEVICES_ENV} must be an integer, got {override!r}.") from None
    return max(512, 64 * (os.cpu_count() or 1))


def check_fake_device_count(count: int) -> None:
    """PreflightError if a mesh of ``count`` devices is implausible as fake CPU devices."""
    limit = max_fake_devices()
    if count > limit:
        raise PreflightError(
            f"the mesh needs {count} devices, but this machine plausibly hosts at most {limit} fake CPU "
            f"devices ({os.cpu_count()} cores; each fake device costs memory and threads); check the mesh "
            f"sizes, or set {MAX_FAKE_DEVICES_ENV}={count} to override."
        )


BF16_CPU_FLAG = "--xla_disable_hlo_passes=all-reduce-promotion"
"""XLA's CPU pass that widens bfloat16 all-reduces to float32 aborts the process
(``Invalid binary instruction opcode copy``) on one inside a shard_map that
leaves some mesh axes automatic, as the model's region does with axes of size
1. Without the pass the CPU runtime sums bfloat16 directly, correctly
(tests/test_mixed_precision.py). Read when jax initialises its backends."""


def _add_xla_flag(flag: str) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if flag not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def allow_bf16_cpu_all_reduce() -> None:
    """Adds ``BF16_CPU_FLAG`` to ``XLA_FLAGS`` (before jax initialises; CPU runs only)."""
    _add_xla_flag(BF16_CPU_FLAG)


def use_deterministic_gpu_ops() -> None:
    """XLA's ``--xla_gpu_deterministic_ops`` (no effect on CPU); read when jax starts."""
    if "xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
        _add_xla_flag("--xla_gpu_deterministic_ops=true")


def provide_cpu_devices(count: int) -> None:
    """Makes jax expose ``count`` CPU devices (fake ones on a single host).

    Must run before jax initialises its backends (before the first jax
    operation). PreflightError for an implausible count (``check_fake_device_count``);
    RuntimeError when jax already runs with fewer devices.
    """
    check_fake_device_count(count)
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
        coordinator, processes, rank = (env[name] for name in LAUNCH_ENV)
        jax.distributed.initialize(coordinator, int(processes), int(rank))
    else:
        jax.distributed.initialize()  # SLURM, Open MPI, JAX_COORDINATOR_ADDRESS: detected by JAX
    return True


def prepare_devices(device_count: int, *, deterministic: bool = False) -> None:
    """Before the first jax operation: joins a multi-process run if the
    environment describes one (its devices are then set by the launcher or
    the cluster); otherwise provides ``device_count`` fake CPU devices, after
    checking the count is plausible."""
    if deterministic:
        use_deterministic_gpu_ops()
    if not start_cluster():
        provide_cpu_devices(device_count)  # checks the count is plausible first


def device_memory_bytes() -> int:
    """The memory one local device can use: its allocator's limit on GPU and TPU;
    on CPU the host's available memory shared by the local (fake) devices."""
    devices = jax.local_devices()
    stats = devices[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return _host_available_bytes() // len(devices)


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_memory(needed: int, what: str, remedy: str) -> None:
    """PreflightError when ``needed`` bytes per device exceed ``device_memory_bytes()``."""
    available = device_memory_bytes()
    if needed > available:
        raise PreflightError(
            f"{what} needs about {needed / 2**30:,.1f} GiB per device, but a device here has "
            f"{available / 2**30:,.1f} GiB; {remedy}."
        )


def device_memory_in_use() -> int | None:
    """The most bytes in use on any of this process's devices, where the backend
    reports it (GPU, TPU: ``memory_stats()['bytes_in_use']``; None on CPU)."""
    used = [(device.memory_stats() or {}).get("bytes_in_use") for device in jax.local_devices()]
    used = [u for u in used if u is not None]
    return max(used) if used else None
