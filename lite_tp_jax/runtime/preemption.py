"""Preemption: SIGTERM asks a run to checkpoint at the next step boundary and exit.

Multi-process (``jax.distributed`` initialised): JAX's preemption service owns
SIGTERM (it swallows the signal) and ``reached_preemption_sync_point(step)``
turns True on every process at the same step, so all of them save that step.
One process: a SIGTERM handler sets a flag that the loop reads after each
step. Either way ``lite-tp train`` then exits ``ExitCode.PREEMPTED`` (143) and
the rerun of the same command resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
    """``with PreemptionWatch() as watch: ... if watch.reached(step): save; stop``."""

    def __init__(self) -> None:
        self.signalled = False
        self._previous = None
        self._distributed = jax.process_count() > 1

    def __enter__(self) -> "PreemptionWatch":
        if not self._distributed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True

    def reached(self, step: int) -> bool:
        """True once the run should checkpoint ``step`` and exit (every process
        calls this at every step, with the same ``step``)."""
        if self._distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled
