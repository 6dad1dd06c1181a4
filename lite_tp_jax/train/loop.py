"""The training job behind ``lite-tp train``: set up, resume, train, checkpoint.

``Trainer(config, run_dir)`` does everything that can fail on bad input (mesh,
data, model shape, an incompatible checkpoint) before the first step, so the
CLI can tell bad input (exit 2) from a failure at run time (exit 1).

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``
(one JSON object per step) and ``checkpoints/``. Starting on a directory that
already has a checkpoint resumes from it: parameters, optimizer state and the
data position, so the loss curve continues exactly as if never interrupted.

In a run of several processes every process trains and checkpoints its
shards; only process 0 prints progress and writes ``config.yaml`` and
``metrics.jsonl`` (``lite-tp launch`` keeps the others' output in
``logs/rank-K.log``).

Before the first step the run directory is claimed: both directories must
take a file (``preflight.check_writable``) and no other process may train in
it (``run_lock.RunLock``; a second ``lite-tp train`` exits 2). During the
run, a step whose update was dropped as non-finite stops the run
(``train.on_nonfinite=stop``, NonFiniteError) or is counted (``skip``:
``skipped`` and ``skipped_steps`` in the metrics); a SIGTERM checkpoints the
step just finished and stops (``preempted_at``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import jax
from flax import nnx
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from lite_tp_jax.fault.spare import Spares
from lite_tp_jax.mesh import make_mesh_for
from lite_tp_jax.train.checkpoint import Checkpointer, NonFiniteError
from lite_tp_jax.layers.moe import MoEMLP
from lite_tp_jax.models.transformer import check_batch
from lite_tp_jax.models.transformer import check_fits_mesh as model_fits_mesh
from lite_tp_jax.train.config import Config, ConfigError, dump_config, key_path
from lite_tp_jax.validate import FitError
from lite_tp_jax.train.data import Batches, device_batch, load_tokens
from lite_tp_jax.train.preemption import PreemptionWatch
from lite_tp_jax.train.preflight import check_writable
from lite_tp_jax.train.run_lock import RunLock
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
    a last line torn by a crash in the middle of writing it. A damaged line
    elsewhere is dropped with a warning naming the file and the line."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if path.exists():
            whole = path.read_text(errors="replace").split("\n")[:-1]  # text after the last newline is torn
            for number, line in enumerate(whole, start=1):
                record = _parse_record(line)
                if record is None:
                    if line:
                        print(f"lite-tp: warning: {path}:{number} is damaged (not a JSON record with a step); "
                              f"skipping it", file=sys.stderr, flush=True)
                    continue
                if record["step"] <= resume_step or "event" in record:  # events (restarts, takeovers) stay
                    kept.append(line)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def is_primary() -> bool:
    """True in the process that writes the run's files and prints (process 0)."""
    return jax.process_index() == 0


def _parse_record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int)
    return record if ok else None


def check_finite_step(record: dict, policy: str, last_checkpoint: int | None) -> None:
    """``train.on_nonfinite=stop``: NonFiniteError naming the step and the value
    when the step was skipped for a non-finite loss or gradient norm."""
    if not record["skipped"] or policy != "stop":
        return
    what = next(
        (f"{name} is {record[name]}" for name in ("loss", "grad_norm") if not math.isfinite(record[name])),
        f"the update made parameters non-finite (loss {record['loss']:.4g}, grad_norm {record['grad_norm']:.4g})",
    )
    kept = f"checkpoint {last_checkpoint} is intact" if last_checkpoint is not None else "no checkpoint was saved"
    raise NonFiniteError(
        f"step {record['step']}: {what} (train.on_nonfinite=stop); {kept}; "
        f"lower train.lr, or set train.on_nonfinite=skip to drop such updates."
    )


class Trainer:
    def __init__(self, config: Config, run_dir: str | os.PathLike):
        self.config = config
        self.run_dir = Path(run_dir)
        self.mesh = make_mesh_for(asdict(config.mesh))
        check_fits_mesh(config, self.mesh)
        self.spares = Spares(config, self.mesh, self.run_dir)
        train = config.train
        self.batches = Batches(load_tokens(config.data, config.model.vocab_size), train.global_batch, train.seq_len, train.seed)
        self.lock, self.checkpointer = None, None
        fresh = not self.run_dir.exists()
        try:
            self._claim_run_dir()
            self.model, self.optimizer = create_model_and_optimizer(config.model, train, self.mesh)
            self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=config.checkpoint.keep)
            self.start_step, self.skipped_steps = 0, 0
            if self.checkpointer.latest_step() is not None:
                state, progress = self.checkpointer.restore(nnx.state((self.model, self.optimizer)), self.mesh)
                nnx.update((self.model, self.optimizer), state)
                self.start_step = int(progress["step"])
                self.skipped_steps = int(progress.get("skipped_steps", 0))
        except BaseException:
            self.close()
            if fresh:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self.last_checkpoint = self.start_step if self.start_step else None
        self.metrics = None
        if is_primary():
            dump_config(config, self.run_dir / "config.yaml")
            self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.start_step)
        self.step = TrainStep(self.model, self.optimizer, train)
        self.preempted_at: int | None = None

    def _claim_run_dir(self) -> None:
        """Before anything is built: the run and checkpoint directories take
        files, and no other process trains in this run directory."""
        check_writable(self.run_dir, "run directory")
        if jax.process_index() == 0:
            self.lock = RunLock(self.run_dir)
            self.lock.acquire()
        check_writable(self.run_dir / "checkpoints", "checkpoint directory")

    def close(self) -> None:
        """Finishes the checkpoint in flight and releases the run directory."""
        try:
            if self.checkpointer is not None:
                self.checkpointer.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _save(self, step: int) -> None:
        self.checkpointer.save(
            step, nnx.state((self.model, self.optimizer)),
            {"step": step, "data_position": step, "skipped_steps": self.skipped_steps},
        )
        self.last_checkpoint = step

    def run(self, *, show_progress: bool = True) -> list[dict]:
        """Trains from the resumed step to ``train.steps``; returns this run's
        metrics. Stops early, after a checkpoint, when preempted (SIGTERM)."""
        try:
            with PreemptionWatch() as preemption:
                return self._run(preemption, show_progress)
        finally:
            self.close()

    def _run(self, preemption: PreemptionWatch, show_progress: bool) -> list[dict]:
        train, every = self.config.train, self.config.checkpoint.every
        records = []
        progress = Progress(
            TextColumn("step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tokens_per_s]:,.0f} tok/s"),
            TimeRemainingColumn(), disable=not (show_progress and is_primary()),
        )
        with progress:
            task = progress.add_task("train", total=train.steps, completed=self.start_step, loss=float("nan"), tokens_per_s=0.0)
            for position in range(self.start_step, train.steps):
                self.spares.before_step(self, position)  # an injected device failure: a spare takes over
                inputs, targets = device_batch(self.batches, position, batch_sharding(self.mesh))
                started = time.perf_counter()
                metrics = jax.device_get(self.step(inputs, targets))
                elapsed = time.perf_counter() - started
                record = {
                    "step": position + 1,
                    **{name: float(value) for name, value in metrics.items()},
                    "step_time_s": elapsed,
                    "tokens_per_s": train.global_batch * train.seq_len / elapsed,
                }
                check_finite_step(record, train.on_nonfinite, self.last_checkpoint)
                self.skipped_steps += int(record["skipped"])
                record["skipped_steps"] = self.skipped_steps
                if self.metrics is not None:
                    self.metrics.append(record)
                records.append(record)
                progress.update(task, completed=position + 1, loss=record["loss"], tokens_per_s=record["tokens_per_s"])
                if preemption.reached(position + 1):
                    self._save(position + 1)
                    self.preempted_at = position + 1
                    break
                if (position + 1) % every == 0 or position + 1 == train.steps:
                    self._save(position + 1)
        return records
