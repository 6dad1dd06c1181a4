"""Goodput: where a run's wall time went, as one summary line and one ``goodput`` event.

The trainer charges each interval of this process's run to one category:

* ``productive_step_s``: training steps whose update was applied (their
  ``step_time_s``, measured around the step and its ``device_get``);
* ``skipped_step_s``: steps whose update was dropped (``train.on_nonfinite: skip``);
* ``compile_s``: compiling the step before step 1 (a persistent-cache hit
  makes it a load, ``runtime/compile_cache.py``);
* ``checkpoint_s``: waiting for checkpoints (the blocking part of a save, and
  the wait for the last one at the end);
* ``data_s``: waiting for a batch (reading it and putting it on the devices);
* ``takeover_s``: spare takeovers in this process (``spare_takeover`` events:
  new mesh, shards moved, step recompiled);
* ``other_s``: the rest of ``wall_s``: setting up (mesh, data, model,
  optimizer, restoring a checkpoint), logging, the Python loop.

``wall_s`` runs from the trainer's creation to the end of the run in this
process. Restarts are what came before this process: from the ``restart``
events of ``metrics.jsonl`` (written by ``lite-tp launch --max-restarts``), their
count and the seconds from each failure to the first step after it (which
include the next attempt's start-up and compile), kept apart from ``wall_s``;
``takeovers`` counts every ``spare_takeover`` event of the run directory.
``goodput`` is ``productive_step_s / wall_s``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from lite_tp_jax.runtime.metrics import parse_record, whole_lines

CATEGORIES = ("productive_step_s", "skipped_step_s", "compile_s", "checkpoint_s", "data_s", "takeover_s")


class Goodput:
    def __init__(self):
        self.started = time.perf_counter()
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)

    def add(self, category: str, seconds: float) -> None:
        self.seconds[category] += seconds

    @contextmanager
    def measure(self, category: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(category, time.perf_counter() - started)

    def event(self, step: int, metrics_path: Path | None) -> dict:
        """The ``goodput`` event at the end of the run (restarts and takeovers from ``metrics_path``)."""
        wall = time.perf_counter() - self.started
        events = [r for r in map(parse_record, whole_lines(metrics_path)) if r and "event" in r] if metrics_path else []
        restarts = [e for e in events if e["event"] == "restart"]
        counted = self.seconds | {"other_s": max(wall - sum(self.seconds.values()), 0.0)}
        return {
            "event": "goodput", "step": step, "wall_s": round(wall, 3),
            **{name: round(value, 3) for name, value in counted.items()},
            "goodput": round(self.seconds["productive_step_s"] / wall, 4) if wall > 0 else 0.0,
            "restarts": len(restarts),
            "restart_s": round(sum(e.get("seconds_to_first_step") or 0.0 for e in restarts), 3),
            "takeovers": sum(e["event"] == "spare_takeover" for e in events),
        }


def summary(event: dict) -> str:
    """One line: ``goodput 61%: 8.8 s of 14.4 s wall in steps; compile 3.1 s, ...``."""
    names = {"compile_s": "compile", "checkpoint_s": "checkpoint waits", "data_s": "data waits",
             "takeover_s": "spare takeovers", "skipped_step_s": "skipped steps", "other_s": "setup and the rest"}
    parts = [f"{label} {event[name]:.1f} s" for name, label in names.items()
             if event[name] or name not in ("takeover_s", "skipped_step_s")]
    restarts = (f"; {event['restarts']} restart(s) before this process, {event['restart_s']:.1f} s from failure to "
                f"the next first step" if event["restarts"] else "")
    takeovers = f"; {event['takeovers']} spare takeover(s)" if event["takeovers"] else ""
    return (f"goodput {event['goodput']:.0%}: {event['productive_step_s']:.1f} s of {event['wall_s']:.1f} s wall in "
            f"productive steps; {', '.join(parts)}{restarts}{takeovers}")
