"""The training job behind ``lite-tp train``: set up, resume, train, checkpoint.

``Trainer(config, run_dir)`` does everything that can fail on bad input (mesh,
data, model shape, an incompatible checkpoint) before the first step, so the
CLI can tell bad input (exit 2) from a failure at run time (exit 1).

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``
(one JSON object per step) and ``checkpoints/``. Starting on a directory that
already has a checkpoint resumes from it: parameters, optimizer state and the
data position, so the loss curve continues exactly as if never interrupted.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from lite_tp_jax.fault.spare import Spares
from lite_tp_jax.mesh import make_mesh_for
from lite_tp_jax.train.checkpoint import Checkpointer
from lite_tp_jax.layers.moe import MoEMLP
from lite_tp_jax.models.transformer import check_batch
from lite_tp_jax.models.transformer import check_fits_mesh as model_fits_mesh
from lite_tp_jax.train.config import Config, ConfigError, dump_config, key_path
from lite_tp_jax.validate import FitError
from lite_tp_jax.train.data import Batches, load_tokens
from lite_tp_jax.train.step import TrainStep, batch_sharding, check_grad_accum, create_model_and_optimizer


def check_fits_mesh(config: Config, mesh) -> None:
    """The model and the batch fit the mesh (rules owned by the model); errors name config keys."""
    try:
        model_fits_mesh(config.model, mesh)
        train = config.train
        check_batch(config.model, mesh, train.global_batch, train.seq_len, train.microbatches if train.grad_accum == 1 else 1)
        check_grad_accum(train, mesh)
        if config.model.moe_every:
            MoEMLP.check_experts(config.model.num_experts, mesh)
    except FitError as error:
        raise ConfigError(error.format(key_path)) from None


class MetricsLog:
    """``metrics.jsonl``: one line per step. On resume, lines past the
    checkpoint's step (steps that will run again) are dropped first, and so is
    a last line torn by a crash in the middle of writing it."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if path.exists():
            whole = path.read_text().split("\n")[:-1]  # text after the last newline is torn
            kept = [line for line in whole if line and json.loads(line)["step"] <= resume_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class Trainer:
    def __init__(self, config: Config, run_dir: str | os.PathLike):
        self.config = config
        self.run_dir = Path(run_dir)
        self.mesh = make_mesh_for(asdict(config.mesh))
        check_fits_mesh(config, self.mesh)
        self.spares = Spares(config, self.mesh, self.run_dir)
        train = config.train
        self.batches = Batches(load_tokens(config.data, config.model.vocab_size), train.global_batch, train.seq_len, train.seed)
        self.model, self.optimizer = create_model_and_optimizer(config.model, train, self.mesh)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=config.checkpoint.keep)
        self.start_step = 0
        if self.checkpointer.latest_step() is not None:
            state, progress = self.checkpointer.restore(nnx.state((self.model, self.optimizer)), self.mesh)
            nnx.update((self.model, self.optimizer), state)
            self.start_step = int(progress["step"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, self.run_dir / "config.yaml")
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.start_step)
        self.step = TrainStep(self.model, self.optimizer, train)

    def run(self, *, show_progress: bool = True) -> list[dict]:
        """Trains from the resumed step to ``train.steps``; returns this run's metrics."""
        train, every = self.config.train, self.config.checkpoint.every
        records = []
        progress = Progress(
            TextColumn("step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tokens_per_s]:,.0f} tok/s"),
            TimeRemainingColumn(), disable=not show_progress,
        )
        with progress:
            task = progress.add_task("train", total=train.steps, completed=self.start_step, loss=float("nan"), tokens_per_s=0.0)
            for position in range(self.start_step, train.steps):
                self.spares.before_step(self, position)  # an injected device failure: a spare takes over
                inputs, targets = (jax.device_put(a, batch_sharding(self.mesh)) for a in self.batches.batch(position))
                started = time.perf_counter()
                metrics = jax.device_get(self.step(inputs, targets))
                elapsed = time.perf_counter() - started
                record = {
                    "step": position + 1,
                    **{name: float(value) for name, value in metrics.items()},
                    "step_time_s": elapsed,
                    "tokens_per_s": train.global_batch * train.seq_len / elapsed,
                }
                if not np.isfinite(record["loss"]):
                    raise FloatingPointError(f"loss became {record['loss']} at step {position + 1}.")
                self.metrics.append(record)
                records.append(record)
                progress.update(task, completed=position + 1, loss=record["loss"], tokens_per_s=record["tokens_per_s"])
                if (position + 1) % every == 0 or position + 1 == train.steps:
                    self.checkpointer.save(
                        position + 1,
                        nnx.state((self.model, self.optimizer)),
                        {"step": position + 1, "data_position": position + 1},
                    )
        return records
