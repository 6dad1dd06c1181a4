"""Data-parallel fallback: a spare device takes a failed device's place.

``mesh.spares: k`` keeps k devices out of the mesh (``make_mesh_for`` builds
the mesh over the first devices; the spares are the next ones). When device
D at mesh coordinates (d, p, e, t) fails, ``take_over``:

1. builds a new ``Mesh`` over the new device list: the same axes and shape,
   the next spare in D's slot;
2. rebuilds every array of (model, optimizer) on it from per-device shards
   (``jax.make_array_from_single_device_arrays``): each surviving device keeps
   its shard in place (no copy), and the spare gets D's shard copied device
   to device from (d', p, e, t), the same (pipeline, expert, tensor) rank of
   another data-parallel replica, whose shards equal D's. D's shards are
   never read;
3. points the model and optimizer at the new mesh (``rebind_mesh``: the
   layers' ``mesh`` attributes and the parameters' metadata), gives them those
   arrays, and re-jits and compiles the train step for the new mesh. The
   interrupted step then runs again, and training goes on in the same
   process, bit for bit as without the failure: the compiled program is the
   same, only its devices changed.
   An event line ``{"event": "spare_takeover", ...}`` in ``metrics.jsonl``
   records the failed device, the spare, the step, and the seconds taken
   (``compile_seconds`` of them compiling).

With ``mesh.data`` = 1 there is no replica, so D's shards exist nowhere
else; with no spare left there is no device to take D's slot. Then the
trainer raises ``DeviceLost`` and ``lite-tp train`` exits with
``DEVICE_LOST_EXIT`` (3) and one line saying why: a supervisor (``lite-tp
launch --max-restarts``) restarts the job from the last checkpoint.

Failures are injected (``fault.fail_device``, ``fault.fail_step``), since a
fake CPU device cannot fail, and only in the first run on a run directory, so
that a restart does not fail again: when step S is about to be dispatched, D's
shards are overwritten with NaN (integers with their largest value), so a
takeover that read them could not match the fault-free run. The step is
interrupted before it consumed its (donated) state. A real failure in the
middle of a step would also lose the donated state of the survivors; the
state after step S - 1 would then have to be kept (not donated, or a copy
in host memory). A real detector (``multihost_utils.live_devices`` in a
multi-process job, which reports failed *processes*) would call
``Spares.take_over`` with the failed device.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lite_tp_jax.mesh import DATA, make_mesh
from lite_tp_jax.train.config import Config, ConfigError
from lite_tp_jax.plan.rules import param_shardings
from lite_tp_jax.train.step import TrainStep, batch_sharding

if TYPE_CHECKING:
    from lite_tp_jax.train.loop import Trainer

DEVICE_LOST_EXIT = 3  # lite-tp train's exit code: restart from the last checkpoint


class DeviceLost(RuntimeError):
    """A device failed and no spare with a data-parallel replica can take its place."""


def spare_devices(mesh: Mesh, count: int) -> list[jax.Device]:
    """The ``count`` spares: the first devices that are not in ``mesh``."""
    in_mesh = set(mesh.devices.flat)
    return [device for device in jax.devices() if device not in in_mesh][:count]


def slot_of(mesh: Mesh, device: jax.Device) -> tuple[int, ...]:
    """The mesh coordinates of ``device``, e.g. (data, pipeline, expert, tensor)."""
    (slot,) = np.argwhere(mesh.devices == device)
    return tuple(int(i) for i in slot)


def replace_device(mesh: Mesh, failed: jax.Device, spare: jax.Device) -> Mesh:
    """``mesh`` with ``spare`` in ``failed``'s slot (same axes, same shape)."""
    devices = [spare if device == failed else device for device in mesh.devices.flat]
    return make_mesh(**mesh.shape, devices=devices)


def replica_of(mesh: Mesh, failed: jax.Device) -> jax.Device | None:
    """The device at ``failed``'s (pipeline, expert, tensor) coordinates in the
    next data-parallel replica; None when there is only one replica."""
    axis = mesh.axis_names.index(DATA)
    if mesh.devices.shape[axis] == 1:
        return None
    slot = list(slot_of(mesh, failed))
    slot[axis] = (slot[axis] + 1) % mesh.devices.shape[axis]
    return mesh.devices[tuple(slot)]


def _indices(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> dict[jax.Device, tuple]:
    """device -> the (start, stop, step) of its shard in every dimension."""
    return {
        device: tuple(s.indices(n) for s, n in zip(index, shape))
        for device, index in sharding.addressable_devices_indices_map(shape).items()
    }


def move_array(
    array: jax.Array, target: NamedSharding, failed: jax.Device, replica: jax.Device | None, name: str
) -> tuple[jax.Array, int]:
    """``array`` resharded to ``target`` (a sharding over the new mesh) from the
    shards of surviving devices only; returns it with the bytes copied.

    A device that already holds the shard it needs keeps it; any other (the
    spare) gets a copy, from ``replica`` when it holds that shard, otherwise
    from any surviving device that does. Raises DeviceLost when none does.
    """
    held = _indices(array.sharding, array.shape)
    surviving = {shard.device: shard.data for shard in array.addressable_shards if shard.device != failed}
    pieces, copied = [], 0
    for device, index in _indices(target, array.shape).items():
        if device in surviving and held[device] == index:
            pieces.append(surviving[device])
            continue
        sources = [d for d in (replica, *surviving) if d in surviving and held[d] == index]
        if not sources:
            raise DeviceLost(
                f"device {failed.id} failed and no surviving device holds a copy of its shard "
                f"of {name!r}"
            )
        piece = jax.device_put(surviving[sources[0]], device)
        pieces.append(piece)
        copied += piece.nbytes
    return jax.make_array_from_single_device_arrays(array.shape, target, pieces), copied


def rebind_mesh(graph, old: Mesh, new: Mesh) -> None:
    """Points every module attribute and parameter metadata that holds ``old``
    at ``new``: the same model, now run (and its arrays described) over the
    new mesh. Layers keep nothing else of their mesh but its axis sizes, which
    a takeover does not change."""
    for _, node in nnx.iter_graph(graph):
        if isinstance(node, nnx.Variable):
            if node.get_metadata().get("mesh") is old:
                node.set_metadata(mesh=new)
        elif isinstance(node, nnx.Pytree):
            for name, value in list(vars(node).items()):
                if value is old:
                    setattr(node, name, new)


def _poisoned(array: jax.Array, failed: jax.Device) -> jax.Array:
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


def inject_failure(trainer: Trainer, failed: jax.Device) -> None:
    """Makes ``failed``'s shards of the trainer's state garbage (a fake CPU
    device cannot fail by itself)."""
    state = nnx.state((trainer.model, trainer.optimizer))
    for _, variable in nnx.to_flat_state(state):
        variable.set_value(_poisoned(variable.get_value(), failed))
    nnx.update((trainer.model, trainer.optimizer), state)


class Spares:
    """A run's spare devices, its injected failure (``fault.*``) and the takeover.

    The injected failure fires in the first ``lite-tp train`` on a run
    directory only (no ``metrics.jsonl`` yet): the same command run again, as a
    restart after exit 3 is, resumes without failing again.
    """

    def __init__(self, config: Config, mesh: Mesh, run_dir: Path):
        self.config = config
        self.devices = spare_devices(mesh, config.mesh.spares)
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
            if not (Path(run_dir) / "metrics.jsonl").exists():
                self.failure = (in_mesh[fault.fail_device], fault.fail_step)

    def before_step(self, trainer: Trainer, position: int) -> None:
        """When the injected failure's step (``position + 1``) starts: the
        device fails and a spare takes over, or DeviceLost is raised."""
        if self.failure is None or self.failure[1] != position + 1:
            return
        failed, step = self.failure
        self.failure = None
        inject_failure(trainer, failed)
        self.take_over(trainer, failed, step)

    def take_over(self, trainer: Trainer, failed: jax.Device, step: int) -> dict:
        """Moves the trainer onto a mesh with a spare in ``failed``'s slot (see
        the module docstring); logs and returns the ``spare_takeover`` event."""
        started = time.perf_counter()
        replica = replica_of(trainer.mesh, failed)
        if replica is None or not self.devices:
            why = (
                "mesh.data is 1, so no data-parallel replica holds a copy of its shards"
                if replica is None
                else f"no spare device is left (mesh.spares={self.config.mesh.spares})"
            )
            latest = trainer.checkpointer.latest_step()
            raise DeviceLost(
                f"device {failed.id} failed at step {step} and {why}; restart from the last "
                f"checkpoint ({f'step {latest}' if latest is not None else 'none yet: from step 0'})."
            )
        spare = self.devices.pop(0)
        mesh = replace_device(trainer.mesh, failed, spare)
        state = nnx.state((trainer.model, trainer.optimizer))
        shardings = dict(nnx.to_flat_state(param_shardings(state, mesh)))
        copied = 0
        for path, variable in nnx.to_flat_state(state):  # the live Variables: no old array is left
            name = ".".join(str(part) for part in path)
            array, nbytes = move_array(variable.get_value(), shardings[path], failed, replica, name)
            variable.set_value(array)
            copied += nbytes
        rebind_mesh((trainer.model, trainer.optimizer), trainer.mesh, mesh)
        trainer.mesh = mesh
        trainer.step = TrainStep(trainer.model, trainer.optimizer, self.config.train)
        compile_started = time.perf_counter()
        tokens, targets = (
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_sharding(mesh))
            for a in trainer.batches.batch(step - 1)
        )
        trainer.step.lower(tokens, targets).compile()  # jit reuses it for the replayed step
        finished = time.perf_counter()
        event = {
            "event": "spare_takeover",
            "step": step,
            "failed_device": failed.id,
            "spare": spare.id,
            "replica": replica.id,
            "slot": dict(zip(mesh.axis_names, slot_of(mesh, spare))),
            "copied_bytes": copied,
            "seconds": finished - started,
            "compile_seconds": finished - compile_started,
        }
        trainer.metrics.append(event)
        return event
