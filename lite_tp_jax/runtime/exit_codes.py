"""The exit codes of every ``lite-tp`` command, in one place. No jax here."""

from __future__ import annotations

import enum
import signal


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1
    """A bug or a failure at run time: a traceback, or one line for a known failure (a non-finite loss)."""
    BAD_INPUT = 2
    """Input the user controls is wrong (``BadInput``): one line, no traceback, nothing half-written."""
    DEVICE_LOST = 3
    """A device failed and no spare could take its place: restart from the last checkpoint."""
    DIVERGED = 4
    """Stopped on a non-finite loss or gradient (``train.on_nonfinite=stop``): the same
    command would fail the same way, so ``lite-tp launch --max-restarts`` does not retry it."""
    INTERRUPTED = 128 + signal.SIGINT
    """Ctrl-C."""
    PREEMPTED = 128 + signal.SIGTERM
    """Preempted by SIGTERM after saving a checkpoint (what a shell reports for SIGTERM): rerun to continue."""
