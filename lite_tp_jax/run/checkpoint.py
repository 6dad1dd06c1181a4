"""Checkpoints with orbax-checkpoint, restorable onto any mesh, never lost.

What is saved is the logical state, as separate items: ``model`` (every
parameter) and ``optimizer`` (moments and step counts), each variable with the
padding of uneven shards sliced away, under its path, plus a small JSON
``progress`` record (step and data position). So inference and conversion
restore the ``model`` item alone and build no optimizer. A checkpoint of the
first format (one ``state`` item holding the (model, optimizer) pair as
``0/...`` and ``1/...``) still restores, item by item. On restore each array is
read straight into the current mesh's sharding (orbax reads only the slices a
device needs) and padded for the current TP degree. So a run saved at TP 4
resumes at TP 2, TP 8, TP 3 or data 2 x tensor 4.

Guarantees:

* Atomic: orbax writes to ``<step>.orbax-checkpoint-tmp`` and renames it when
  complete, so a kill -9 during a save leaves the previous checkpoint as the
  latest.
* Asynchronous: ``save`` returns once the arrays are copied to host memory;
  the files are written while the next steps run. The save finishes (and is
  sealed) at the next ``save``, ``wait`` or ``close``.
* Sealed: a finished save gets ``lite_tp_manifest.json`` (the format version,
  and size and CRC-32 of every file). A checkpoint whose files are missing, truncated or changed is
  *damaged*; ``restore`` warns in one line naming it and falls back to the
  newest intact one. So does a checkpoint holding a NaN or infinity.
* Finite: ``save`` refuses a state with a non-finite value.
* Room: ``save`` refuses (RunDirError, one line) to start a checkpoint the
  file system cannot hold, and a save that fails for a full disk leaves no
  temporary directory behind: the previous checkpoint stays the latest.
* Rotation keeps the newest ``keep`` checkpoints and, whatever they are, the
  newest intact one that is not suspect.
* Set aside, never deleted by a decision: a checkpoint that is damaged, taken
  after a spike (*suspect*, ``train/divergence.py``) or past the step a run
  resumes from (``--resume-step``) is renamed ``<step>.<why>-<time>`` in the
  same directory (``set_aside``): orbax no longer sees it, rotation never
  deletes it, and ``resume_at`` can bring it back. A suspect checkpoint holds
  ``lite_tp_suspect.json`` (the spike), wherever it is.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from lite_tp_jax.core.errors import BadInput
from lite_tp_jax.runtime.run_dir import RunDirError, atomic_write, check_free_space, disk_full_message
from lite_tp_jax.sharding.state import flat_variables, logical_sharding, logical_shape, to_logical, to_physical

MANIFEST = "lite_tp_manifest.json"
SUSPECT = "lite_tp_suspect.json"
SET_ASIDE_NAME = re.compile(r"(\d+)\.([a-z-]+?)-(\d{8}-\d{6})(?:-(\d+))?")  # <step>.<why>-<time>[-<n>]
FORMAT = 2
"""Checkpoint format: 1, one ``state`` item of the (model, optimizer) pair; 2, ``model`` and ``optimizer`` items."""
ITEMS = ("model", "optimizer")
_FIRST_FORMAT_PREFIX = {"model": "0/", "optimizer": "1/"}  # format 1's names within its ``state`` item


class CheckpointError(BadInput):
    """A checkpoint that does not fit the model being restored, or none usable."""


class _RotatedAway(Exception):
    """The checkpoint being read was deleted by the run writing it (rotation)."""


_ROTATION_RETRIES = 20


@contextlib.contextmanager
def _quiet_aborted_reads():
    """While restoring: a read that a writer's rotation cut short leaves orbax's
    worker threads calling into its closed event loop, and each prints a
    traceback through ``sys.excepthook``; those are dropped (the read is retried)."""
    previous = sys.excepthook

    def hook(kind, error, tb):
        if not (kind is RuntimeError and str(error) == "Event loop is closed"):
            previous(kind, error, tb)

    sys.excepthook = hook
    try:
        yield
    finally:
        sys.excepthook = previous


class NonFiniteError(FloatingPointError):
    """A NaN or infinity where training state must be finite."""


def display_name(item: str, name: str) -> str:
    """A checkpoint entry as users name it: ``embed/embedding`` of the model item
    reads ``model.embed.embedding``."""
    return f"{item}.{name.replace('/', '.')}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _warn(message: str) -> None:
    print(f"lite-tp: warning: {message}", file=sys.stderr, flush=True)


@jax.jit
def _finite_flags(arrays: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.isfinite(x).all() for x in arrays])


def first_non_finite(arrays: dict[str, jax.Array]) -> str | None:
    """The name of the first array holding a NaN or infinity, or None (one
    compiled reduction per array, one transfer of a bool vector)."""
    names = sorted(arrays)
    if not names:
        return None
    finite = jax.device_get(_finite_flags([arrays[n] for n in names]))
    bad = np.flatnonzero(~np.asarray(finite))
    return names[bad[0]] if bad.size else None


def bytes_to_save(arrays: dict[str, dict[str, jax.Array]]) -> int:
    """About the bytes this process writes for one checkpoint of ``arrays``
    (``{item: {name: logical array}}``): its share of every array, plus a margin
    for orbax's metadata."""
    total = sum(a.size * a.dtype.itemsize for item_arrays in arrays.values() for a in item_arrays.values())
    return int(total / jax.process_count() * 1.05) + (1 << 20)


def _is_disk_full(error: BaseException) -> bool:
    """True when ``error``, or one it wraps, is ENOSPC (orbax and tensorstore wrap
    the OSError, or report it only as text)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


# --------------------------------------------------------------------------
# Manifest: what "intact" means
# --------------------------------------------------------------------------


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: Path) -> None:
    """Seals a finished checkpoint: the format, and size and CRC-32 of each of its files."""
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, _crc32(p)] for p in _files(step_dir)}
    atomic_write(step_dir / MANIFEST, json.dumps({"format": FORMAT, "files": files}, indent=0, sort_keys=True))


def _manifest_files(manifest: dict) -> dict:
    """The ``{file: [size, crc]}`` of a manifest (format 1's were the top level)."""
    return manifest["files"] if isinstance(manifest.get("files"), dict) else manifest


def damage(step_dir: Path) -> str | None:
    """What is wrong with a sealed checkpoint's files (one phrase), or None.
    A checkpoint without a manifest (saved by an older version, or killed
    between orbax's commit and the seal) is not judged here."""
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        return None
    try:
        entries = _manifest_files(json.loads(manifest.read_text()))
        entries = {name: (int(size), int(crc)) for name, (size, crc) in entries.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return f"its {MANIFEST} is unreadable"
    for name, (size, crc) in entries.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if _crc32(path) != crc:
            return f"{name} does not match its checksum"
    return None


def _aside_name(directory: Path, step: int, why: str) -> Path:
    """A free ``<step>.<why>-<time>[-<n>]`` in ``directory``."""
    base = f"{step}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = directory / base, 1
    while target.exists():
        target, n = directory / f"{base}-{n}", n + 1
    return target


def _all_processes_here(name: str) -> None:
    """A barrier across the processes of a multi-process run (none in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_progress(step_dir: Path) -> dict | None:
    """The ``progress`` record of a checkpoint directory (live or set aside), or None."""
    try:
        return json.loads((step_dir / "progress" / "metadata").read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores a run's items (``model``, ``optimizer``) under ``directory``."""

    def __init__(self, directory: str | os.PathLike, *, keep: int):
        self.directory = Path(os.path.abspath(directory))
        self.keep = keep
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=False, enable_async_checkpointing=True)
        handlers = {item: ocp.StandardCheckpointHandler() for item in (*ITEMS, "state")}  # "state": format 1
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(*handlers, "progress"),
            item_handlers={**handlers, "progress": ocp.JsonCheckpointHandler()},
        )
        self._pending: int | None = None  # a save started but not yet sealed
        self._last_size = 0  # bytes of the last save started
        self._sealed: set[int] = set()  # sealed by this process: known good without re-reading

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps()) if self.directory.exists() else []

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ---- saving ----

    def save(self, step: int, items: dict[str, nnx.State], progress: dict[str, Any]) -> None:
        """Starts an asynchronous save of ``items`` (``{"model": state,
        "optimizer": state}``) as checkpoint ``step``; it is finished and sealed
        by the next ``save``, ``wait`` or ``close`` (call ``close`` when done
        with the Checkpointer).

        Raises NonFiniteError (saving nothing) if any value is NaN or infinite.
        """
        arrays = {item: {name: to_logical(v) for name, v in flat_variables(state, "/").items()}
                  for item, state in items.items()}
        for item, item_arrays in arrays.items():
            bad = first_non_finite(item_arrays)
            if bad is not None:
                raise NonFiniteError(
                    f"refusing to save checkpoint {step}: {display_name(item, bad)!r} holds a NaN or infinity."
                )
        self.wait()
        if step in self.all_steps():  # a damaged checkpoint that resuming skipped
            self._set_aside(step)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._last_size = bytes_to_save(arrays)
        check_free_space(self.directory, self._last_size, f"checkpoint {step} could not be written")
        saves = {item: ocp.args.StandardSave(item_arrays) for item, item_arrays in arrays.items()}
        self.manager.save(step, args=ocp.args.Composite(**saves, progress=ocp.args.JsonSave(progress)), force=True)
        self._pending = step

    def check_space(self, items: dict[str, nnx.State]) -> None:
        """Before the first step: RunDirError unless the checkpoint directory has room for one checkpoint."""
        arrays = {item: {name: to_logical(v) for name, v in flat_variables(state, "/").items()} for item, state in items.items()}
        check_free_space(self.directory, bytes_to_save(arrays), "no checkpoint could be written")

    def wait(self) -> None:
        """Finishes the save in flight, seals it and rotates old checkpoints.

        Every process rotates (orbax's delete is collective: each process must
        call it, for the same steps); the step just finished on all of them is
        known good everywhere, so they all keep the same ones. Process 0 writes
        the manifest."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - the write failed: nothing of it is kept
            self._failed(step, error)
        if jax.process_index() == 0:
            write_manifest(self._step_dir(step))
        self._sealed.add(step)
        self.rotate()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    def check(self) -> None:
        """After each step: raises at once if the save in flight has failed
        (RunDirError for a full disk), not at the next save."""
        if self._pending is None:
            return
        try:
            self.manager.check_for_errors()
        except Exception as error:  # noqa: BLE001
            step, self._pending = self._pending, None
            self._failed(step, error)

    def _failed(self, step: int, error: Exception):
        """A save of ``step`` failed: its temporary directory is removed (the
        previous checkpoints stay as they were); a full disk is one line."""
        for leftover in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self.manager.reload()
        if _is_disk_full(error):
            raise RunDirError(f"checkpoint {step} could not be written: {disk_full_message(self.directory, self._last_size)}") from None
        raise error

    def _set_aside(self, step: int) -> None:
        target = _aside_name(self.directory, step, "damaged")
        _warn(f"moving checkpoint {self._step_dir(step)} aside to {target.name} before saving step {step} again")
        os.replace(self._step_dir(step), target)
        self.manager.reload()

    def set_aside(self, steps: list[int], why: str = "set-aside") -> list[Path]:
        """Renames checkpoints ``steps`` to ``<step>.<why>-<time>`` beside the
        others (process 0; every process calls it, and reloads the step list
        once all are done). Returns the new paths."""
        self.wait()
        moved = [_aside_name(self.directory, step, why) for step in steps]
        if jax.process_index() == 0:
            for step, target in zip(steps, moved):
                os.replace(self._step_dir(step), target)
        _all_processes_here(f"lite_tp_set_aside_{'_'.join(map(str, steps))}")
        self.manager.reload()
        return moved

    def set_aside_steps(self) -> dict[int, list[Path]]:
        """``{step: [directory, ...]}`` of the checkpoints set aside, oldest first."""
        found: dict[int, list[Path]] = {}
        for path in sorted(self.directory.iterdir(), key=lambda p: p.name) if self.directory.exists() else []:
            match = SET_ASIDE_NAME.fullmatch(path.name)
            if match and path.is_dir():
                found.setdefault(int(match[1]), []).append(path)
        return found

    def mark_suspect(self, steps: list[int], spike: dict) -> None:
        """Writes ``lite_tp_suspect.json`` (the spike) into checkpoints ``steps``
        (process 0; outside the manifest, so they stay intact)."""
        self.wait()
        if jax.process_index() == 0:
            for step in steps:
                atomic_write(self._step_dir(step) / SUSPECT, json.dumps(spike))

    def resume_at(self, step: int) -> tuple[list[int], bool]:
        """Makes checkpoint ``step`` the latest, for ``--resume-step``: the later
        ones are set aside; a set-aside ``step`` (the newest of that step) is
        brought back. CheckpointError, before anything moves, when there is no
        checkpoint ``step`` or it is damaged. Returns the steps set aside."""
        self.wait()
        live, aside = self.all_steps(), self.set_aside_steps()
        source = self._step_dir(step) if step in live else aside.get(step, [None])[-1]
        if source is None:
            listed = ", ".join(map(str, live)) or "none"
            extra = f" (set aside: {', '.join(map(str, sorted(aside)))})" if aside else ""
            raise CheckpointError(f"There is no checkpoint {step} in {self.directory} to resume from; it holds "
                                  f"{listed}{extra}; `lite-tp checkpoints {self.directory.parent}` lists them.")
        problem = damage(source) if (source / MANIFEST).exists() else "it was never sealed (no manifest)"
        if problem is not None:
            raise CheckpointError(f"Checkpoint {source} is damaged ({problem}); choose another step to resume from "
                                  f"(`lite-tp checkpoints {self.directory.parent}` lists them).")
        later = [s for s in live if s > step]
        self.set_aside(later)
        if step not in live:
            if jax.process_index() == 0:
                os.replace(source, self._step_dir(step))
            _all_processes_here(f"lite_tp_reinstate_{step}")
            self.manager.reload()
        return later, step not in live

    def intact(self, step: int) -> bool:
        return step in self._sealed or ((self._step_dir(step) / MANIFEST).exists() and damage(self._step_dir(step)) is None)

    def _trusted(self, step: int) -> bool:
        return self.intact(step) and not (self._step_dir(step) / SUSPECT).exists()

    def rotate(self) -> None:
        """Deletes all but the newest ``keep`` checkpoints, never the newest
        intact one that is not suspect."""
        steps = sorted(self.all_steps(), reverse=True)
        kept = set(steps[: self.keep])
        if not any(self._trusted(s) for s in kept):
            newest_intact = next((s for s in steps[self.keep:] if self._trusted(s)), None)
            kept |= {newest_intact} - {None}
        for step in steps:
            if step not in kept:
                self.manager.delete(step)
                self._sealed.discard(step)

    # ---- restoring ----

    def restore(self, items: dict[str, nnx.State], mesh: Mesh, step: int | None = None) -> dict[str, Any]:
        """Reads a checkpoint into ``items`` (``{"model": state}``, optionally
        with ``"optimizer"``), in place: each variable gets its value, shaped
        and sharded for ``mesh`` (an abstract ``eval_shape`` state is filled
        too). Returns the progress record.

        ``step=None``: the newest intact checkpoint. Damaged or non-finite ones
        are skipped with a one-line warning each. A checkpoint of another model
        raises CheckpointError naming the first mismatching parameter.
        """
        self.wait()
        variables = {item: flat_variables(state, "/") for item, state in items.items()}
        with _quiet_aborted_reads():
            return self._restore_retrying(variables, mesh, step)

    def _restore_retrying(self, variables, mesh: Mesh, step: int | None) -> dict[str, Any]:
        for _ in range(_ROTATION_RETRIES):
            steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
            if not steps:
                raise CheckpointError(f"No checkpoint found in {self.directory}.")
            if step is not None and not self._step_dir(step).is_dir():
                raise CheckpointError(f"Checkpoint {self._step_dir(step)} does not exist.")
            try:
                return self._restore_newest(steps, variables, mesh, one=step is not None)
            except _RotatedAway:  # a writer rotated it out while it was read: look again
                self.manager.reload()
        raise CheckpointError(
            f"the checkpoints in {self.directory} were rotated away {_ROTATION_RETRIES} times while being read; "
            f"read them when the run pauses, or train with a larger checkpoint.keep."
        )

    def _gone(self, step: int) -> bool:
        """True when checkpoint ``step`` is vanishing: rotated away by the run writing
        it (a deletion in progress is given a moment to finish)."""
        for _ in range(5):
            if not self._step_dir(step).is_dir():
                return True
            time.sleep(0.1)
        return False

    def _restore_newest(self, steps: list[int], variables, mesh: Mesh, *, one: bool) -> dict[str, Any]:
        """Restores the first usable of ``steps`` into ``variables``; _RotatedAway when
        one vanished under the reader (never called damaged)."""
        skipped = []
        for candidate in steps:
            try:
                problem = damage(self._step_dir(candidate))
            except OSError:
                problem = "its files vanished while being checked"
            if problem is not None and self._gone(candidate):
                raise _RotatedAway(candidate)
            restored = None
            if problem is None:
                try:
                    saved = self._saved_shapes(candidate)
                    for item, item_variables in variables.items():
                        if item not in saved:
                            raise CheckpointError(f"Checkpoint {self._step_dir(candidate)} holds no {item} (it holds "
                                                  f"{', '.join(saved) or 'nothing'}).")
                        self._check_matches(candidate, item, item_variables, saved[item])
                    restored = self._read(candidate, variables, mesh)
                except CheckpointError:
                    if self._gone(candidate):
                        raise _RotatedAway(candidate) from None
                    raise
                except Exception as error:  # noqa: BLE001 - any failure to read means damaged
                    if self._gone(candidate):
                        raise _RotatedAway(candidate) from None
                    problem = f"orbax cannot read it: {type(error).__name__}: {_first_line(error)}"
            if restored is not None:
                arrays, progress = restored
                for item, item_arrays in arrays.items():
                    bad = first_non_finite(item_arrays)
                    if bad is not None:
                        problem, restored = f"{display_name(item, bad)!r} holds a NaN or infinity", None
                        break
            if restored is None:
                skipped.append(candidate)
                if one:
                    raise CheckpointError(f"Checkpoint {self._step_dir(candidate)} is unusable: {problem}.")
                _warn(f"checkpoint {self._step_dir(candidate)} is damaged ({problem}); trying an older one")
                continue
            for item, item_variables in variables.items():
                for name, variable in item_variables.items():
                    variable.set_value(to_physical(variable, arrays[item][name], mesh))
            return dict(progress)
        raise CheckpointError(
            f"No intact checkpoint in {self.directory}: steps {', '.join(map(str, skipped))} are all damaged "
            f"(each was checked and left in place); train into a new --run-dir to start afresh."
        )

    def _is_first_format(self, step: int) -> bool:
        return (self._step_dir(step) / "state").is_dir()

    def _saved_shapes(self, step: int) -> dict[str, dict[str, tuple[int, ...]]]:
        """``{item: {name: logical shape}}`` as saved (format 1's pair split into its items)."""
        metadata = self.manager.item_metadata(step)
        if not self._is_first_format(step):
            saved = {item: metadata[item] for item in ITEMS if (self._step_dir(step) / item).is_dir()}
            return {item: {name: tuple(m.shape) for name, m in (item_metadata or {}).items()}
                    for item, item_metadata in saved.items()}
        return {
            item: {name.removeprefix(prefix): tuple(m.shape) for name, m in metadata.state.items() if name.startswith(prefix)}
            for item, prefix in _FIRST_FORMAT_PREFIX.items()
        }

    def _check_matches(self, step: int, item: str, variables: dict[str, nnx.Variable], saved: dict) -> None:
        """CheckpointError naming the first parameter whose name or shape differs."""
        for name, variable in sorted(variables.items()):
            here, shown = logical_shape(variable), display_name(item, name)
            if name not in saved:
                problem = f"{shown!r} {list(here)} is in this model but not in the checkpoint"
            elif saved[name] != tuple(here):
                problem = f"{shown!r} is {list(saved[name])} in the checkpoint but {list(here)} in this model"
            else:
                continue
            raise CheckpointError(
                f"Checkpoint {self._step_dir(step)} does not match this model: {problem} "
                f"(a different model config? use another --run-dir to start afresh)."
            )
        extra = sorted(set(saved) - set(variables))
        if extra:
            raise CheckpointError(
                f"Checkpoint {self._step_dir(step)} does not match this model: {display_name(item, extra[0])!r} "
                f"{list(saved[extra[0]])} is in the checkpoint but not in this model "
                f"(a different model config? use another --run-dir to start afresh)."
            )

    def _read(self, step: int, variables: dict[str, dict[str, nnx.Variable]], mesh: Mesh):
        """``({item: {name: logical array}}, progress)`` of the items asked for, read
        straight into the mesh's (logical) shardings."""
        targets = {
            item: {
                name: jax.ShapeDtypeStruct(logical_shape(v), v.dtype, sharding=logical_sharding(v, mesh))
                for name, v in item_variables.items()
            }
            for item, item_variables in variables.items()
        }
        if not self._is_first_format(step):
            restores = {item: ocp.args.StandardRestore(target) for item, target in targets.items()}
            restored = self.manager.restore(step, args=ocp.args.Composite(**restores, progress=ocp.args.JsonRestore()))
            return {item: restored[item] for item in targets}, restored.progress
        pair = {_FIRST_FORMAT_PREFIX[item] + name: t for item, target in targets.items() for name, t in target.items()}
        with ocp.PyTreeCheckpointer() as reader:  # format 1: the items asked for, out of the pair
            state = reader.restore(self._step_dir(step) / "state", args=ocp.args.PyTreeRestore(
                pair, restore_args=ocp.checkpoint_utils.construct_restore_args(pair), partial_restore=True))
        progress = self.manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())).progress
        arrays = {item: {name: state[_FIRST_FORMAT_PREFIX[item] + name] for name in target}
                  for item, target in targets.items()}
        return arrays, progress


def restore_set_aside(step_dir: Path, items: dict[str, nnx.State], mesh: Mesh) -> dict[str, Any]:
    """``Checkpointer.restore`` of a set-aside checkpoint directory
    (``<step>.<why>-<time>``), read where it lies (through a link named ``<step>``
    in a temporary directory); returns its progress record."""
    step = int(SET_ASIDE_NAME.fullmatch(step_dir.name)[1])
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(step_dir.resolve(), Path(tmp) / str(step))
        reader = Checkpointer(tmp, keep=1)
        try:
            return reader.restore(items, mesh, step=step)
        finally:
            reader.close()
