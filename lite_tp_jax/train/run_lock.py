"""One training run per run directory: an advisory lock on ``<run_dir>/.lock``.

The lock is ``flock`` on a file holding the owner's pid. The kernel drops it
when the owner exits, however it exits (kill -9 included), so a lock left by
a dead process is simply taken over, with a warning naming that pid. A second
``lite-tp train`` on a directory in use fails at once (RunLockError, exit 2),
naming the process that holds it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """The run directory is in use by another process."""


class RunLock:
    """``with RunLock(run_dir):`` holds the (existing) run directory for this process."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise RunLockError(
                    f"run directory {self.run_dir} is in use by process {self._holder()} "
                    f"(another lite-tp train); wait for it to finish, stop it, or choose another --run-dir."
                ) from None
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
