"""Abort and restart: the spec's first answer to a failed tensor-parallel rank.

    lite-tp launch --processes N --max-restarts K [--hang-timeout S] -- train CONFIG --run-dir DIR ...

Tensor parallelism is tightly coupled: when one process dies, the others block
in their next collective. ``supervise`` runs the launch; when a process dies, or
no training step completes for S seconds (a hang), every process is stopped
(SIGKILL) and the whole job started again. ``lite-tp train`` on a run directory
resumes from its last good checkpoint by itself, so the run continues exactly;
the steps redone after a restart replace their earlier lines in
``metrics.jsonl``, so each step is recorded once.

A restart drops ``--resume-step N`` and ``--skip-batches K`` once the run
has logged that resume (``once_resumed``): it continues from the last
checkpoint rather than going back to N again.

At most K restarts, then the last failure's exit code. Bad input (exit 2) is
never retried, nor a run stopped on a non-finite value (exit 4: the same
checkpoint and data would meet it again), nor a preempted run (exit 143: it saved a checkpoint; rerun the
same command when the machines are back). When the first step after a restart completes, one event line
goes to ``metrics.jsonl``::

    {"event": "restart", "cause": "...", "rank": 1, "step": 7, "restart": 1, "seconds_to_first_step": 12.3}

``step`` is the step that was running when the failure was seen (the last
completed one plus one, the step a worker's error names); ``seconds_to_first_step``
runs from the moment the failure was seen to the first step of the new
attempt (stopping, start-up, restore and compilation included).

Hangs are measured from the attempt's first completed step: start-up and the
first compilation are never a hang.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lite_tp_jax.runtime.exit_codes import ExitCode
from lite_tp_jax.runtime.launch import free_port, run_attempt, worker_environment
from lite_tp_jax.runtime.metrics import METRICS_FILE, append_record, is_step, parse_record, whole_lines


class StepWatch:
    """Watches ``metrics.jsonl`` for newly completed steps (a line not seen before:
    a resume rewrites the file, but rewritten lines were seen already)."""

    def __init__(self, path: Path):
        self.path = path
        self.seen = set(whole_lines(path))

    def new_steps(self) -> list[int]:
        """Steps whose lines appeared since the last call."""
        steps = []
        for line in whole_lines(self.path):
            if line in self.seen:
                continue
            self.seen.add(line)
            record = parse_record(line)
            if is_step(record):
                steps.append(record["step"])
        return steps

    def last_step(self) -> int | None:
        """The last step recorded in the file (None before the first)."""
        for line in reversed(whole_lines(self.path)):
            record = parse_record(line)
            if is_step(record):
                return record["step"]
        return None


class _Attempt:
    """The watchdog of one attempt: reports a hang, and writes the pending
    restart event when the attempt's first step completes."""

    def __init__(self, watch: StepWatch, hang_timeout: float | None, pending: dict | None, failed_at: float | None):
        self.watch, self.hang_timeout = watch, hang_timeout
        self.pending, self.failed_at = pending, failed_at
        self.last_progress: float | None = None  # None until the first step of this attempt

    def __call__(self) -> str | None:
        now = time.monotonic()
        if self.watch.new_steps():
            self.last_progress = now
            if self.pending is not None:
                append_record(self.watch.path, {**self.pending, "seconds_to_first_step": round(now - self.failed_at, 3)})
                self.pending = None
        elif self.hang_timeout and self.last_progress is not None and now - self.last_progress > self.hang_timeout:
            return f"no training step completed in {self.hang_timeout:g} s (hang)"
        return None


ONCE_FLAGS = ("--resume-step", "--skip-batches")


def once_resumed(argv: Sequence[str], metrics: Path) -> list[str]:
    """``argv`` without ``--resume-step N`` and ``--skip-batches K`` once the run
    has logged that resume (a ``resume`` event at step N): a restart continues
    from the last checkpoint instead of going back to N again."""
    argv = list(argv)
    flags: dict[str, tuple[int, int]] = {}  # flag -> (index, number of argv items)
    for i, item in enumerate(argv):
        name = item.split("=", 1)[0]
        if name in ONCE_FLAGS:
            flags[name] = (i, 1 if "=" in item else 2)
    if "--resume-step" not in flags:
        return argv
    i, n = flags["--resume-step"]
    step = argv[i].split("=", 1)[1] if n == 1 else (argv[i + 1] if i + 1 < len(argv) else "")
    resumed = any(
        record is not None and record.get("event") == "resume" and str(record["step"]) == step.strip()
        for record in map(parse_record, whole_lines(metrics))
    )
    if not resumed:
        return argv
    drop = {j for i, n in flags.values() for j in range(i, i + n)}
    return [item for j, item in enumerate(argv) if j not in drop]


def supervise(
    command: Sequence[str],
    processes: int,
    devices_per_process: int,
    run_dir: str | os.PathLike,
    *,
    max_restarts: int,
    hang_timeout: float | None = None,
    argv_prefix: Sequence[str] | None = None,
) -> int:
    """Runs ``lite-tp COMMAND`` in ``processes`` processes, restarting the whole
    job up to ``max_restarts`` times after a failure or a hang (module docstring)."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    argv = [*(argv_prefix or (sys.executable, "-m", "lite_tp_jax.cli")), *command]
    pending, failed_at, restarts = None, None, 0
    while True:
        port = free_port()
        environments = [worker_environment(rank, processes, devices_per_process, port) for rank in range(processes)]
        attempt = _Attempt(StepWatch(metrics), hang_timeout, pending, failed_at)
        outcome = run_attempt(argv, environments, run_dir / "logs", watchdog=attempt, poll_s=0.2, attempt=restarts)
        if outcome.code == ExitCode.DIVERGED:
            print("lite-tp launch: not restarted: the run stopped on a non-finite value, which a restart "
                  "from the same checkpoint would meet again", file=sys.stderr)
            return outcome.code
        if outcome.code in (ExitCode.OK, ExitCode.BAD_INPUT, ExitCode.PREEMPTED, ExitCode.INTERRUPTED):
            return outcome.code
        if restarts == max_restarts:
            if max_restarts:
                print(f"lite-tp launch: giving up after {max_restarts} restart(s)", file=sys.stderr)
            return outcome.code
        if attempt.pending is not None:  # the previous restart never reached a step
            append_record(metrics, {**attempt.pending, "seconds_to_first_step": None})
        restarts += 1
        failed_at = time.monotonic()
        pending = {
            "event": "restart", "cause": outcome.cause, "rank": outcome.rank,
            "step": (StepWatch(metrics).last_step() or 0) + 1, "restart": restarts,
        }
        argv = once_resumed(argv, metrics)
        print(f"lite-tp launch: restart {restarts}/{max_restarts} from the last checkpoint", file=sys.stderr, flush=True)
