"""The training loop's spares, its injected device failure and its injected
loss spike (``fault.*``).

A fake CPU device cannot fail, so a failure is injected: when step
``fault.fail_step`` is about to be dispatched, device ``fault.fail_device``'s
shards of the training state are overwritten with garbage (NaN, or the
dtype's largest integer), so a takeover that read them could not match the
fault-free run. The step is interrupted before it consumed its (donated)
state. A real failure in the middle of a step would also lose the donated
state of the survivors; the state after the previous step would then have to
be kept (not donated, or a copy in host memory). A real detector
(``multihost_utils.live_devices`` in a multi-process job, which reports failed
*processes*) would hand the failed device to the same takeover.

It fires in the first ``lite-tp train`` on a run directory only (no
``metrics.jsonl`` yet): the same command run again, as a restart after exit 3
is, resumes without failing again.

A loss spike (``fault.spike_step = k``, ``InjectedSpike``) multiplies step k's
learning rate by 1e4: the parameters after the step are ``before + 1e4 *
(after - before)``, exactly AdamW's update at 1e4 times the learning rate
(its moments do not depend on the rate; the decoupled weight decay scales
with it). The compiled step is the same as without the fault, so the metrics'
``lr`` shows the scheduled rate. It fires once, the first time step k runs in
the first ``lite-tp train`` on a run directory (a rollback that runs step k
again does not spike again).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lite_tp_jax.run.config import Config, ConfigError
from lite_tp_jax.runtime.metrics import METRICS_FILE
from lite_tp_jax.runtime.spares import spare_devices


def poisoned(array: jax.Array, failed: jax.Device) -> jax.Array:
    """``array`` with its shard on ``failed`` overwritten by garbage (NaN, or
    the dtype's largest integer): what a takeover must never read."""
    if failed not in array.sharding.device_set:
        return array
    garbage = np.nan if np.issubdtype(array.dtype, np.floating) else np.iinfo(array.dtype).max
    pieces = [
        jax.device_put(np.full(shard.data.shape, garbage, array.dtype), failed) if shard.device == failed else shard.data
        for shard in array.addressable_shards
    ]
    return jax.make_array_from_single_device_arrays(array.shape, array.sharding, pieces)


class Spares:
    """A run's spare devices (``mesh.spares``, popped as they take over) and its
    injected failure: ``(device, step)``, or None once fired or when none is due."""

    def __init__(self, config: Config, mesh: Mesh, run_dir: Path):
        self.pool_size = config.mesh.spares
        self.devices = spare_devices(mesh, self.pool_size)
        self.failure: tuple[jax.Device, int] | None = None
        fault = config.fault
        if fault.fail_device is not None:
            in_mesh = {device.id: device for device in mesh.devices.flat}
            if fault.fail_device not in in_mesh:
                spares = f" ({', '.join(str(d.id) for d in self.devices)} are spares)" if self.devices else ""
                raise ConfigError(
                    f"'fault.fail_device' ({fault.fail_device}) is not a device of the mesh; "
                    f"choose one of the mesh's device ids {sorted(in_mesh)}{spares}"
                )
            if not (Path(run_dir) / METRICS_FILE).exists():
                self.failure = (in_mesh[fault.fail_device], fault.fail_step)

    def failing_before(self, step: int) -> jax.Device | None:
        """The device that fails as ``step`` starts (once), or None."""
        if self.failure is None or self.failure[1] != step:
            return None
        failed, self.failure = self.failure[0], None
        return failed


SPIKE_LR_FACTOR = 1e4


class InjectedSpike:
    """``fault.spike_step``: that step's learning rate times ``SPIKE_LR_FACTOR``, once."""

    def __init__(self, spike_step: int | None, run_dir: Path):
        fresh = not (Path(run_dir) / METRICS_FILE).exists()
        self.step = spike_step if fresh else None

    def run(self, step: int, model: nnx.Module, train_step: Callable[[], dict]) -> dict:
        """Runs ``train_step()`` (step ``step``), blowing its update up if it is the injected one."""
        if step != self.step:
            return train_step()
        self.step = None
        params = [v for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        before = _copy([v.get_value() for v in params])  # the step donates the originals
        metrics = train_step()
        for variable, value in zip(params, _blow_up(before, [v.get_value() for v in params]), strict=True):
            variable.set_value(value)
        return metrics


@jax.jit
def _copy(arrays: list[jax.Array]) -> list[jax.Array]:
    return [x.copy() for x in arrays]


@jax.jit
def _blow_up(before: list[jax.Array], after: list[jax.Array]) -> list[jax.Array]:
    return [old + SPIKE_LR_FACTOR * (new - old) for old, new in zip(before, after, strict=True)]
