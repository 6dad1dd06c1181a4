"""The logs people read: ``metrics.jsonl`` first, then TensorBoard and W&B from its records.

``RunLog.append(record)`` writes the record to ``metrics.jsonl`` (the source of
truth, ``runtime/metrics.py``), then hands the same dict to each sink:

* ``TensorBoardSink`` (``logging.tensorboard``, on by default): tensorboardX
  event files under ``RUN_DIR/tensorboard``. Each number of a step record is a
  scalar ``train/NAME`` at its step (loss, lr, grad_norm, param_norm,
  tokens_per_s, mfu, step_time_s, device memory in use where the backend
  reports it); each number of an event is ``EVENT/NAME`` (``goodput/compile_s``,
  ``restart/seconds_to_first_step``, ...). A resumed run purges the steps it
  will redo, as ``metrics.jsonl`` drops their lines.
* ``WandbSink`` (``logging.wandb_project``): one Weights & Biases run in
  ``RUN_DIR/wandb`` with the same numbers. ``wandb`` is imported only then;
  missing, it is a ``BadInput`` before anything runs. When the W&B service
  cannot be reached (offline, no API key), the run is kept offline
  (``wandb sync`` uploads it later) instead of failing.

Only process 0 writes them (as it writes ``metrics.jsonl``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from lite_tp_jax.core.errors import BadInput
from lite_tp_jax.run.config import LoggingConfig
from lite_tp_jax.runtime.metrics import MetricsLog

TENSORBOARD_DIR = "tensorboard"


def numbers(record: dict) -> dict[str, float]:
    """The record's numeric fields except ``step`` (booleans and strings are not scalars)."""
    return {name: float(value) for name, value in record.items()
            if name != "step" and isinstance(value, int | float) and not isinstance(value, bool)}


class TensorBoardSink:
    def __init__(self, run_dir: Path, resume_step: int):
        from tensorboardX import SummaryWriter

        self.directory = run_dir / TENSORBOARD_DIR
        self.writer = SummaryWriter(str(self.directory), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        prefix = record.get("event", "train")
        for name, value in numbers(record).items():
            self.writer.add_scalar(f"{prefix}/{name}", value, record["step"])

    def close(self) -> None:
        self.writer.close()


def check_wandb(logging: LoggingConfig) -> None:
    """BadInput when ``logging.wandb_project`` is set and ``wandb`` is not installed."""
    if logging.wandb_project is None:
        return
    try:
        import wandb  # noqa: F401  (imported only when asked for)
    except ImportError:
        raise BadInput(
            f"'logging.wandb_project' is {logging.wandb_project!r} but the wandb package is not installed; "
            f"pip install wandb, or set logging.wandb_project=null (TensorBoard and metrics.jsonl need nothing)"
        ) from None


class WandbSink:
    def __init__(self, project: str, run_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        options = dict(project=project, dir=str(run_dir), name=run_dir.resolve().name, config=config)
        try:
            self.run = wandb.init(**options)
        except Exception as error:  # no network, no API key: keep the run offline rather than fail
            print(f"lite-tp: warning: W&B is unreachable ({type(error).__name__}: {error}); logging offline in "
                  f"{run_dir / 'wandb'} (upload later with `wandb sync`)", file=sys.stderr, flush=True)
            self.run = wandb.init(**options, mode="offline")

    def write(self, record: dict) -> None:
        values = numbers(record)
        if "event" in record:
            self.run.log({f"{record['event']}/{name}": value for name, value in values.items()})
        else:
            self.run.log({f"train/{name}": value for name, value in values.items() if math.isfinite(value)},
                         step=record["step"])

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """``metrics.jsonl`` and the sinks written from its records (same ``append`` as ``MetricsLog``)."""

    def __init__(self, metrics: MetricsLog, sinks: list):
        self.metrics, self.sinks = metrics, sinks
        self.path = metrics.path

    @classmethod
    def open(cls, metrics: MetricsLog, logging: LoggingConfig, run_dir: Path, resume_step: int,
             config: dict) -> RunLog:
        sinks = []
        if logging.tensorboard:
            sinks.append(TensorBoardSink(run_dir, resume_step))
        if logging.wandb_project is not None:
            sinks.append(WandbSink(logging.wandb_project, run_dir, config))
        return cls(metrics, sinks)

    def append(self, record: dict) -> None:
        self.metrics.append(record)  # first: the source of truth
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
