"""A run directory: one training run at a time, files that take writes, and
writes that are never half done.

* ``RunLock``: an advisory lock (``flock``) on ``<run_dir>/.lock``, a file
  holding the owner's pid. The kernel drops it when the owner exits, however
  it exits (kill -9 included), so a lock left by a dead process is simply
  taken over, with a warning naming that pid. A second ``lite-tp train`` on a
  directory in use fails at once (RunLockError, exit 2), naming the holder.
* ``check_run_dir``: a ``--run-dir`` is new, empty or a run directory; a
  folder holding other files (``--run-dir .``, a project, a dataset) is
  refused before anything is written into it.
* ``check_writable``: the run and checkpoint directories are probed with a
  real file before step 1, so an unwritable directory is not discovered at
  the first save, after the training before it.
* ``check_free_space``: a checkpoint is not started on a file system that
  cannot hold it (one line naming the directory and the bytes needed).
* ``atomic_write``: a file appears complete or not at all (a temporary file in
  the same directory, fsynced, then renamed over the target);
  ``atomic_directory`` the same for a directory of files (a tokenized corpus).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lite_tp_jax.core.errors import BadInput

LOCK_NAME = ".lock"


class RunLockError(BadInput, RuntimeError):
    """The run directory is in use by another process."""


class RunDirError(BadInput):
    """A run or checkpoint directory that cannot take files."""


RUN_MARKERS = ("checkpoints", "metrics.jsonl")
"""Entries only a run writes: a folder holding one of them is a run directory."""
LAUNCH_ENTRIES = frozenset({"logs", LOCK_NAME})
"""What ``lite-tp launch`` (and a refused start) may leave in a folder before the run writes anything."""


def check_run_dir(run_dir: str | os.PathLike) -> None:
    """RunDirError unless ``run_dir`` names a new or empty folder, or a run
    directory (one holding ``checkpoints/`` or ``metrics.jsonl``): a run writes
    ``config.yaml`` and ``metrics.jsonl`` into it, which must never replace a
    user's own files."""
    if not str(run_dir).strip():
        raise RunDirError("--run-dir is empty; name a directory for the run, e.g. --run-dir runs/first.")
    path = Path(run_dir)
    if not path.is_dir():
        return  # new (made later), or not a directory (check_writable says so)
    try:
        entries = set(os.listdir(path))
    except OSError as error:
        raise RunDirError(f"the run directory {path} cannot be listed ({error.strerror}); "
                          f"fix its permissions or choose another --run-dir.") from None
    if not entries or entries & set(RUN_MARKERS) or entries <= LAUNCH_ENTRIES:
        return
    shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
    raise RunDirError(
        f"{path} holds other files ({shown}) and is not a lite-tp run directory (one holding checkpoints/ or "
        f"metrics.jsonl); choose a new or empty --run-dir, e.g. --run-dir runs/first."
    )


def check_writable(directory: str | os.PathLike, what: str) -> None:
    """RunDirError unless ``directory`` exists (or can be made) and takes a file."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise RunDirError(
            f"the {what} {directory} is not a writable directory ({reason}); fix its permissions or choose another --run-dir."
        ) from None


def disk_full_message(directory: str | os.PathLike, needed: int) -> str:
    """One sentence: ``directory`` lacks ``needed`` bytes, and what to do."""
    free = shutil.disk_usage(directory).free if os.path.isdir(directory) else 0
    return (f"{directory} has {_size(free)} free but a checkpoint needs about {_size(needed)}; free space there, "
            f"lower checkpoint.keep, or choose another --run-dir.")


def check_free_space(directory: str | os.PathLike, needed: int, what: str) -> None:
    """RunDirError (``what``: the sentence's start) when ``directory``'s file system
    has fewer than ``needed`` bytes free."""
    if shutil.disk_usage(directory).free < needed:
        raise RunDirError(f"{what}: {disk_full_message(directory, needed)}")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def atomic_write(path: str | os.PathLike, data: str | bytes, *, mode: int = 0o644) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the whole
    new one: a temporary file in the same directory, flushed and fsynced, then
    ``os.replace``. Missing parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_directory(out) as tmp:`` fill ``tmp`` (a hidden sibling of
    ``out``); when the block ends normally its files are fsynced and it is
    renamed to ``out``, else (an error, Ctrl-C) it is removed: ``out`` appears
    complete or not at all. ``out`` must not exist yet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        yield tmp
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0o700 would hide the corpus from other users
        os.rename(tmp, path)  # fails if path appeared meanwhile: nothing is overwritten
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class RunLock:
    """``with RunLock(run_dir):`` holds the (existing) run directory for this process."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self._acquire()
        except OSError as error:  # a full disk, a read-only file system: the lock file cannot be written
            raise RunDirError(f"the run directory {self.run_dir} cannot take its lock file ({error.strerror}); "
                              f"free space there or choose another --run-dir.") from None

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise self._in_use() from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break  # locked the file that is still at the path (not one a releaser just unlinked)
            os.close(fd)
        previous = os.read(fd, 64).decode(errors="replace").strip()
        if previous and previous != str(os.getpid()):
            print(f"lite-tp: warning: taking over the lock of {self.run_dir} left by process {previous}, "
                  f"which is no longer running", file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def check_free(self) -> None:
        """RunLockError at once if another process holds the run directory; holds
        nothing itself (``lite-tp launch`` asks before it starts its workers)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file: free
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise self._in_use() from None
        finally:
            os.close(fd)  # also drops a lock taken here

    def _in_use(self) -> RunLockError:
        return RunLockError(
            f"run directory {self.run_dir} is in use by process {self._holder()} "
            f"(another lite-tp train); wait for it to finish, stop it, or choose another --run-dir."
        )

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "(unknown pid)"
        except OSError:
            return "(unknown pid)"

    def release(self) -> None:
        """Removes the lock file, then unlocks."""
        if self._fd is None:
            return
        os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
