"""Preemption: SIGTERM, or Ctrl-C (SIGINT), asks a run to checkpoint at the
next step boundary and exit; a second Ctrl-C stops at once (KeyboardInterrupt).

Multi-process (``jax.distributed`` initialised): JAX's preemption service owns
SIGTERM (it swallows the signal) and ``reached_preemption_sync_point(step)``
turns True on every process at the same step, so all of them save that step.
One process: a SIGTERM or SIGINT handler sets a flag that the loop reads
after each step. Either way ``lite-tp train`` then exits ``ExitCode.PREEMPTED``
(143), or ``ExitCode.INTERRUPTED`` (130) after Ctrl-C, and the rerun of the
same command resumes from that checkpoint. (Under ``lite-tp launch`` the
launcher takes Ctrl-C and sends SIGTERM on to its processes.)
"""

from __future__ import annotations

import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
    """``with PreemptionWatch() as watch: ... if watch.reached(step): save; stop``."""

    def __init__(self) -> None:
        self.signal_name: str | None = None  # "SIGTERM" or "SIGINT" once signalled
        self._previous: dict[int, object] = {}
        self._distributed = jax.process_count() > 1

    @property
    def signalled(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> "PreemptionWatch":
        if not self._distributed and threading.current_thread() is threading.main_thread():
            watched = (signal.SIGTERM, signal.SIGINT)
            self._previous = {number: signal.signal(number, self._on_signal) for number in watched}
        return self

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if signum == signal.SIGINT:
            print("lite-tp: Ctrl-C: saving a checkpoint at the end of this step (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        self.signal_name = signal.Signals(signum).name

    def reached(self, step: int) -> bool:
        """True once the run should checkpoint ``step`` and exit (every process
        calls this at every step, with the same ``step``)."""
        if self._distributed:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = "SIGTERM"
            return self.signalled
        return self.signalled
