"""``metrics.jsonl``: the run's record, one JSON object per line, and its one owner.

Two kinds of line: a step record (``{"step": 7, "loss": ..., ...}``, written by
the training loop) and an event (``{"event": "restart" | "spare_takeover" |
"spike" | "rollback" | "resume" | "goodput", "step": ..., ...}``, written by
the restart supervisor or the trainer; TensorBoard and W&B are written from
the same records, ``train/sinks.py``). On resume, step records past the
checkpoint's step (steps that will run again) are dropped, as is a last line
torn by a crash; events stay. A resume to an earlier checkpoint
(``--resume-step``, a rollback) moves those records to
``metrics.set-aside-<time>.jsonl`` first (``set_aside_records``), so each step
is logged once and none is lost. No jax here: the restart supervisor reads and
appends to the same file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from lite_tp_jax.runtime.run_dir import atomic_write

METRICS_FILE = "metrics.jsonl"


def parse_record(line: str) -> dict | None:
    """The record of one line, or None for a damaged one (not JSON, no integer step)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int)
    return record if ok else None


def whole_lines(path: Path) -> list[str]:
    """The file's complete lines (text after the last newline is torn); none if it does not exist."""
    try:
        return path.read_text(errors="replace").split("\n")[:-1]
    except FileNotFoundError:
        return []


def is_step(record: dict | None) -> bool:
    """A step record, not an event."""
    return record is not None and "event" not in record


def append_record(path: Path, record: dict) -> None:
    """One JSON line appended with a single write (several writers share the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def set_aside_records(path: str | os.PathLike, after_step: int) -> Path | None:
    """Moves the step records past ``after_step`` out of ``metrics.jsonl`` into
    ``metrics.set-aside-<time>.jsonl`` beside it (events stay); returns that
    file, or None when there was nothing to move."""
    path = Path(path)
    lines = whole_lines(path)
    later = [line for line in lines if is_step(record := parse_record(line)) and record["step"] > after_step]
    if not later:
        return None
    aside = path.with_name(f"{path.stem}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.stem}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}-{n}{path.suffix}"), n + 1
    atomic_write(aside, "".join(line + "\n" for line in later))
    moved = set(later)
    atomic_write(path, "".join(line + "\n" for line in lines if line not in moved))
    return aside


def bring_back_records(path: str | os.PathLike, up_to_step: int) -> None:
    """For a resume onto a set-aside checkpoint ``up_to_step``: its steps past
    the last one in ``metrics.jsonl`` move back from the newest set-aside file
    that holds step ``up_to_step`` (they were set aside with it)."""
    path = Path(path)
    lines = whole_lines(path)
    last = max((r["step"] for r in map(parse_record, lines) if is_step(r)), default=0)
    if last >= up_to_step:
        return
    for aside in sorted(path.parent.glob(f"{path.stem}.set-aside-*{path.suffix}"), reverse=True):
        kept = whole_lines(aside)
        records = [(line, parse_record(line)) for line in kept]
        if not any(is_step(r) and r["step"] == up_to_step for _, r in records):
            continue
        back = [line for line, r in records if is_step(r) and last < r["step"] <= up_to_step]
        atomic_write(path, "".join(line + "\n" for line in lines + back))
        atomic_write(aside, "".join(line + "\n" for line in kept if line not in set(back)))
        return


class MetricsLog:
    """The trainer's ``metrics.jsonl``. Opening it for a run resumed at
    ``resume_step`` drops the step records past that step and a torn last line
    first; a damaged line elsewhere is dropped with a warning naming the file
    and the line."""

    def __init__(self, path: str | os.PathLike, resume_step: int):
        self.path = Path(path)
        kept = []
        for number, line in enumerate(whole_lines(self.path), start=1):
            record = parse_record(line)
            if record is None:
                if line:
                    print(f"lite-tp: warning: {self.path}:{number} is damaged (not a JSON record with a step); "
                          f"skipping it", file=sys.stderr, flush=True)
                continue
            if record["step"] <= resume_step or not is_step(record):  # events (restarts, takeovers) stay
                kept.append(line)
        atomic_write(self.path, "".join(line + "\n" for line in kept))

    def append(self, record: dict) -> None:
        append_record(self.path, record)
