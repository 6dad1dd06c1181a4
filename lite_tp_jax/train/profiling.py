"""``lite-tp train --profile START:END``: a ``jax.profiler`` trace of steps START..END.

The trace starts just before step START runs and stops after step END has
finished (its results fetched), so it holds exactly those steps: host and
device activity, each XLA op, each collective. It is written under
``RUN_DIR/profile`` (``RUN_DIR/profile/process-K`` in a run of several
processes) as ``plugins/profile/<time>/<host>.xplane.pb``, which TensorBoard's
profile plugin (``tensorboard --logdir RUN_DIR/profile``) and Perfetto
(through xprof) read.
"""

from __future__ import annotations

from pathlib import Path

import jax

from lite_tp_jax.core.errors import BadInput

PROFILE_DIR = "profile"


def parse_steps(text: str, steps: int) -> tuple[int, int]:
    """``"START:END"`` -> ``(START, END)``, 1 <= START <= END <= ``steps`` (``train.steps``), or BadInput."""
    start, _, end = text.partition(":")
    try:
        first, last = int(start), int(end)
    except ValueError:
        first = last = None
    if first is None or not 1 <= first <= last:
        raise BadInput(f"--profile takes START:END, two steps with 1 <= START <= END (e.g. 5:8), got {text!r}")
    if last > steps:
        raise BadInput(f"--profile {text} ends past train.steps ({steps}); choose steps from 1 to {steps}")
    return first, last


class StepTrace:
    """Starts and stops the profiler around steps ``first..last`` (``before``/``after`` each step)."""

    def __init__(self, steps: tuple[int, int] | None, run_dir: Path):
        self.first, self.last = steps or (0, -1)
        self.directory = run_dir / PROFILE_DIR
        if jax.process_count() > 1:
            self.directory = self.directory / f"process-{jax.process_index()}"
        self.active = False
        self.path: Path | None = None

    def before(self, step: int) -> None:
        if not self.active and self.first <= step <= self.last:  # a resumed run may start inside the range
            jax.profiler.start_trace(str(self.directory))
            self.active, self.started_at = True, step

    def after(self, step: int) -> None:
        if self.active and step >= self.last:
            self.stop(step)

    def stop(self, step: int) -> None:
        """Stops the trace (also when the run ends inside the range) and names its files."""
        if not self.active:
            return
        jax.profiler.stop_trace()
        self.active = False
        traces = sorted(self.directory.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
        self.path = traces[-1].parent if traces else self.directory
        if jax.process_index() == 0:
            print(f"profile of steps {self.started_at}..{step}: {self.path} "
                  f"(tensorboard --logdir {self.directory}, or Perfetto)", flush=True)
