"""``lite-tp checkpoints RUN_DIR``: every checkpoint of a run, live or set aside.

One row per checkpoint directory: its step, when it was saved, the loss at
that step, whether it is intact (its manifest's sizes and checksums hold),
damaged or never sealed, whether it is set aside (``<step>.<why>-<time>``,
``run/checkpoint.py``) and whether it is suspect (its state came from a
spike: it holds ``lite_tp_suspect.json``, or was saved within a spike's
episode under ``train.on_spike: ignore``). Reads files only; writes nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lite_tp_jax.run.checkpoint import SET_ASIDE_NAME, MANIFEST, SUSPECT, CheckpointError, damage, read_progress
from lite_tp_jax.runtime.metrics import METRICS_FILE, is_step, parse_record, whole_lines


def _losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss from ``metrics.jsonl`` and the set-aside metrics files (the live file wins)."""
    losses: dict[int, float] = {}
    for path in [*sorted(run_dir.glob("metrics.set-aside-*.jsonl")), run_dir / METRICS_FILE]:
        for line in whole_lines(path):
            record = parse_record(line)
            if is_step(record) and "loss" in record:
                losses[record["step"]] = record["loss"]
    return losses


def list_checkpoints(run_dir: str | os.PathLike) -> list[dict]:
    """The run's checkpoints, by step, live ones before set-aside ones of the same step."""
    run_dir = Path(run_dir)
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"No checkpoint directory in {run_dir}; `lite-tp checkpoints` takes a run directory.")
    losses, rows = _losses(run_dir), []
    for path in directory.iterdir():
        if not path.is_dir():
            continue
        aside = SET_ASIDE_NAME.fullmatch(path.name)
        if not (path.name.isdigit() or aside):
            continue
        step = int(aside[1] if aside else path.name)
        progress = read_progress(path) or {}
        sealed = (path / MANIFEST).exists()
        problem = damage(path) if sealed else None
        saved = progress.get("time") or (path / MANIFEST if sealed else path).stat().st_mtime
        spike = {"start": progress["suspect_since"]} if progress.get("suspect_since") is not None else None
        if (path / SUSPECT).exists():
            try:
                spike = json.loads((path / SUSPECT).read_text())
            except (OSError, ValueError):
                spike = {}
        loss = progress.get("loss")
        rows.append({
            "step": step, "path": str(path), "time": saved,
            "loss": loss if loss is not None else (losses.get(step) if not aside else None),
            "state": "intact" if sealed and problem is None else f"damaged: {problem}" if sealed else "not sealed",
            "set_aside": aside[2] if aside else None, "suspect": spike is not None,
            "spike_start": (spike or {}).get("start"),
        })
    return sorted(rows, key=lambda r: (r["step"], r["set_aside"] is not None, r["path"]))


def format_checkpoints(rows: list[dict]) -> str:
    """The listing as a table."""
    header = ("step", "saved", "loss", "state", "set aside", "suspect")
    lines = [header]
    for r in rows:
        lines.append((
            str(r["step"]), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"])),
            "-" if r["loss"] is None else f"{r['loss']:.4f}", r["state"],
            r["set_aside"] or "no",
            (f"yes (spike at step {r['spike_start']})" if r["spike_start"] is not None else "yes") if r["suspect"] else "no",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
