"""Data-parallel fallback: a spare device takes a failed device's place.

The mechanics only, on arrays and a mesh: no model, no trainer. ``mesh.spares:
k`` keeps k devices out of the mesh (``core.mesh.make_mesh_for`` builds the
mesh over the first devices; the spares are the next ones). When device D at
mesh slot (d, p, e, t) fails, ``take_over``:

1. builds a new ``Mesh`` over the new device list: the same axes and shape,
   the next spare in D's slot;
2. rebuilds every array on it from per-device shards
   (``jax.make_array_from_single_device_arrays``): each surviving device keeps
   its shard in place (no copy), and the spare gets D's shard copied device
   to device from the same slot of another data-parallel replica (d', p, e,
   t), whose shards equal D's. D's shards are never read;
3. returns the new mesh, the arrays (same shardings' specs, new mesh) and an
   event record for ``metrics.jsonl``.

The caller (the training loop) points its model at the new mesh and compiles
its step for it. With ``mesh.data`` = 1 there is no replica, so D's shards
exist nowhere else; with no spare left there is no device for D's slot. Then
``DeviceLost`` is raised and ``lite-tp train`` exits ``ExitCode.DEVICE_LOST``
(3): a supervisor (``lite-tp launch --max-restarts``) restarts the job from
the last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from lite_tp_jax.core.axes import DATA
from lite_tp_jax.core.mesh import make_mesh


class DeviceLost(RuntimeError):
    """A device failed and no spare with a data-parallel replica can take its place."""


def spare_devices(mesh: Mesh, count: int) -> list[jax.Device]:
    """The ``count`` spares: the first devices that are not in ``mesh``."""
    in_mesh = set(mesh.devices.flat)
    return [device for device in jax.devices() if device not in in_mesh][:count]


def slot_of(mesh: Mesh, device: jax.Device) -> dict[str, int]:
    """The mesh coordinates of ``device``, by axis name."""
    (slot,) = np.argwhere(mesh.devices == device)
    return {axis: int(i) for axis, i in zip(mesh.axis_names, slot)}


def replace_device(mesh: Mesh, failed: jax.Device, spare: jax.Device) -> Mesh:
    """``mesh`` with ``spare`` in ``failed``'s slot (same axes, same shape)."""
    devices = [spare if device == failed else device for device in mesh.devices.flat]
    return make_mesh(mesh.shape, devices=devices)


def replica_of(mesh: Mesh, failed: jax.Device) -> jax.Device | None:
    """The device in ``failed``'s slot of the next data-parallel replica (every
    other axis the same); None when there is only one replica."""
    if mesh.shape[DATA] == 1:
        return None
    slot = slot_of(mesh, failed)
    slot[DATA] = (slot[DATA] + 1) % mesh.shape[DATA]
    return mesh.devices[tuple(slot[axis] for axis in mesh.axis_names)]


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


@dataclass(frozen=True)
class Takeover:
    """What ``take_over`` gives back: the new mesh, the arrays on it (in the
    order given) and the ``spare_takeover`` event (without the caller's step
    and compile time)."""

    mesh: Mesh
    arrays: list[jax.Array]
    event: dict


def take_over(
    arrays: Sequence[jax.Array], names: Sequence[str], mesh: Mesh, failed: jax.Device, spares: list[jax.Device],
    *, pool_size: int,
) -> Takeover:
    """Moves ``arrays`` (named ``names``, for messages) onto a mesh with the
    first of ``spares`` (a pool of ``pool_size`` at the start) in ``failed``'s
    slot, popping it (module docstring). Raises DeviceLost saying why, as a
    clause ("mesh.data is 1, so ..."), when there is no replica or no spare."""
    started = time.perf_counter()
    replica = replica_of(mesh, failed)
    if replica is None:
        raise DeviceLost("mesh.data is 1, so no data-parallel replica holds a copy of its shards")
    if not spares:
        raise DeviceLost(f"no spare device is left (mesh.spares={pool_size})")
    spare = spares.pop(0)
    new_mesh = replace_device(mesh, failed, spare)
    moved, copied = [], 0
    for array, name in zip(arrays, names, strict=True):
        target = NamedSharding(new_mesh, array.sharding.spec)
        array, nbytes = move_array(array, target, failed, replica, name)
        moved.append(array)
        copied += nbytes
    event = {
        "event": "spare_takeover",
        "failed_device": failed.id,
        "spare": spare.id,
        "replica": replica.id,
        "slot": slot_of(new_mesh, spare),
        "copied_bytes": copied,
        "seconds": time.perf_counter() - started,
    }
    return Takeover(new_mesh, moved, event)
