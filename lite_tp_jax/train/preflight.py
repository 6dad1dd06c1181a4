"""Checks that run before anything is built: failures exit 2 in one line.

* ``check_fake_device_count``: on a CPU-only machine each mesh position is a
  fake CPU device with its own memory and threads; a mesh far beyond the
  machine (``mesh.tensor=100000``, a typo) would grow memory without bound.
* ``check_writable``: the run and checkpoint directories are probed with a
  real file before step 1, so an unwritable directory is not discovered at
  the first save, after the training before it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MAX_FAKE_DEVICES_ENV = "LITE_TP_MAX_FAKE_DEVICES"


class PreflightError(ValueError):
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


def check_writable(directory: str | os.PathLike, what: str) -> None:
    """PreflightError unless ``directory`` exists (or can be made) and takes a file."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise PreflightError(
            f"the {what} {directory} is not a writable directory ({reason}); fix its permissions or choose another --run-dir."
        ) from None
