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
take a file and no other process may train in it (``runtime/run_dir.py``; a
second ``lite-tp train`` exits 2). During the run, a step whose update was
dropped as non-finite is counted (``skip``: ``skipped`` and ``skipped_steps``
in the metrics); a non-finite step or a loss spike stops the run, its suspect
checkpoints set aside, or rolls back past it (``train/divergence.py``, hooked
in as ``self.divergence``: the batch each step reads, the spike check, the
rollback); ``resume_step`` resumes from that checkpoint (later ones and their
metrics lines set aside) and ``skip_batches`` skips batches after it; a SIGTERM checkpoints the step just finished and stops
(``preempted_at``); a failed device (injected: ``train/faults.py``) is
replaced by a spare (``_take_over``) or ends the run with DeviceLost.

What people read (``train/sinks.py``, ``step_cost.py``, ``goodput.py``,
``profiling.py``): before step 1 the compiled step's memory per device and
model FLOPs per step are printed (and logged with the goodput); each step
record carries tokens/s and MFU, and goes to TensorBoard (and W&B) as well;
``--profile START:END`` traces those steps; the run ends with a ``goodput``
event and line.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import jax
from flax import nnx
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from lite_tp_jax.core.mesh import make_mesh_for
from lite_tp_jax.run.checkpoint import Checkpointer
from lite_tp_jax.run.config import Config
from lite_tp_jax.run.config_file import config_to_dict, dump_config
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.runtime.metrics import METRICS_FILE, MetricsLog, bring_back_records, set_aside_records
from lite_tp_jax.runtime.devices import device_memory_in_use
from lite_tp_jax.runtime.preemption import PreemptionWatch
from lite_tp_jax.runtime.run_dir import RunLock, check_run_dir, check_writable
from lite_tp_jax.runtime.spares import DeviceLost, take_over
from lite_tp_jax.sharding.rules import batch_sharding
from lite_tp_jax.sharding.state import rebind_mesh
from lite_tp_jax.train.data import device_batch, make_batches
from lite_tp_jax.train.decoder_step import decoder_step
from lite_tp_jax.train.divergence import Divergence, RollBack
from lite_tp_jax.train.faults import InjectedSpike, Spares, poisoned
from lite_tp_jax.train.fit import check_run_fits
from lite_tp_jax.train.goodput import Goodput, summary
from lite_tp_jax.train.profiling import StepTrace
from lite_tp_jax.train.sinks import RunLog, check_wandb
from lite_tp_jax.train.step_cost import StepCost, compile_step, describe


def is_primary() -> bool:
    """True in the process that writes the run's files and prints (process 0)."""
    return jax.process_index() == 0


class Trainer:
    """``peak_flops``: the peak FLOP/s of one device, for MFU (none: no ``mfu``);
    ``profile``: steps ``(first, last)`` to trace (``train/profiling.py``);
    ``resume_step``: resume from that checkpoint (``--resume-step``), then skip
    ``skip_batches`` batches (``--skip-batches``)."""

    def __init__(self, config: Config, run_dir: str | os.PathLike, *, peak_flops: float | None = None,
                 profile: tuple[int, int] | None = None, resume_step: int | None = None, skip_batches: int = 0):
        self.goodput = Goodput()
        self.config = config
        self.run_dir = Path(run_dir)
        check_wandb(config.logging)
        self.mesh = make_mesh_for(config.mesh.requested, spares=config.mesh.spares)
        check_run_fits(config, self.mesh.shape)
        self.spares = Spares(config, self.mesh, self.run_dir)
        self.divergence, self.injected_spike = Divergence(config), InjectedSpike(config.fault.spike_step, self.run_dir)
        self.records, set_aside, brought_back = [], [], False
        train = config.train
        self.batches = make_batches(config)
        self.lock, self.checkpointer = None, None
        fresh = not self.run_dir.exists()
        try:
            self._claim_run_dir()
            self.model, self.optimizer = create_model_and_optimizer(config.model, train, self.mesh)
            self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=config.checkpoint.keep)
            self.start_step, self.skipped_steps = 0, 0
            if resume_step is not None:
                set_aside, brought_back = self.checkpointer.resume_at(resume_step)
            if self.checkpointer.latest_step() is not None:
                self.take_up(self.checkpointer.restore(self._items(), self.mesh, step=resume_step))
            if self.start_step < train.steps:
                self.checkpointer.check_space(self._items())
        except BaseException:
            self.close()
            if fresh:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self.last_checkpoint = self.start_step if self.start_step else None
        self.metrics = None
        self.divergence.skips.add(self.start_step, skip_batches)
        if is_primary():
            if self.start_step < train.steps:  # a finished run's rerun changes nothing on disk
                dump_config(config, self.run_dir / "config.yaml")
            if resume_step is not None:  # the later steps' lines go aside with their checkpoints, or come back
                set_aside_records(self.run_dir / METRICS_FILE, self.start_step)
                if brought_back:
                    bring_back_records(self.run_dir / METRICS_FILE, self.start_step)
            self.metrics = RunLog.open(MetricsLog(self.run_dir / METRICS_FILE, self.start_step), config.logging,
                                       self.run_dir, self.start_step, config_to_dict(config))
            if resume_step is not None or skip_batches:
                self.metrics.append({"event": "resume", "step": self.start_step, "set_aside": set_aside,
                                     "skip_batches": skip_batches, "data_skips": self.divergence.skips.skips})
        self.step = decoder_step(self.model, self.optimizer, train)
        self.cost = StepCost(config, self.mesh.size, peak_flops)
        self.trace = StepTrace(profile, self.run_dir)
        self.goodput_line: str | None = None
        self.last_step, self.compiled = self.start_step, {}
        self.preempted_at: int | None = None
        self.stopped_by: str | None = None  # "SIGTERM" or "SIGINT" (Ctrl-C) when preempted_at is set

    def _claim_run_dir(self) -> None:
        """Before anything is built: the run and checkpoint directories take
        files, and no other process trains in this run directory."""
        check_run_dir(self.run_dir)
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

    def _items(self) -> dict[str, nnx.State]:
        """What a checkpoint holds, as live states (restoring fills them in place)."""
        return {"model": nnx.state(self.model), "optimizer": nnx.state(self.optimizer)}

    def _save(self, step: int, loss: float | None = None) -> None:
        with self.goodput.measure("checkpoint_s"):
            self.checkpointer.save(step, self._items(), {
                "step": step, "skipped_steps": self.skipped_steps, **self.divergence.progress(step), "loss": loss,
                "time": time.time(),
            })
        self.last_checkpoint = step

    def take_up(self, progress: dict) -> None:
        """A restored checkpoint's progress: its step, skipped updates, data skips and spike detector."""
        self.start_step = self.last_step = int(progress["step"])
        self.last_checkpoint = self.start_step or None
        self.skipped_steps = int(progress.get("skipped_steps", 0))
        self.divergence.restore(progress)

    def _take_over(self, failed: jax.Device, step: int) -> None:
        """Device ``failed`` fails as ``step`` starts (injected: its shards become
        garbage); a spare takes its slot (``runtime/spares.py``), the model is
        pointed at the new mesh and the step compiled for it. Logs the
        ``spare_takeover`` event; DeviceLost (exit 3) when no spare can."""
        started = time.perf_counter()
        flat = nnx.to_flat_state(nnx.state((self.model, self.optimizer)))  # the live Variables
        variables = [variable for _, variable in flat]
        for variable in variables:
            variable.set_value(poisoned(variable.get_value(), failed))
        try:
            takeover = take_over(
                [v.get_value() for v in variables], [".".join(map(str, path)) for path, _ in flat],
                self.mesh, failed, self.spares.devices, pool_size=self.spares.pool_size,
            )
        except DeviceLost as lost:
            latest = self.checkpointer.latest_step()
            raise DeviceLost(
                f"device {failed.id} failed at step {step} and {lost}; restart from the last "
                f"checkpoint ({f'step {latest}' if latest is not None else 'none yet: from step 0'})."
            ) from None
        for variable, array in zip(variables, takeover.arrays, strict=True):  # no old array is left
            variable.set_value(array)
        rebind_mesh((self.model, self.optimizer), self.mesh, takeover.mesh)
        self.mesh = takeover.mesh
        self.step = decoder_step(self.model, self.optimizer, self.config.train)
        compile_started = time.perf_counter()
        batch = (
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_sharding(self.mesh))
            for a in self.batches.batch(step - 1)
        )
        self.step.lower(tuple(batch)).compile()  # jit reuses it for the replayed step
        finished = time.perf_counter()
        event = {"event": "spare_takeover", "step": step, **takeover.event}
        event.update(seconds=finished - started, compile_seconds=finished - compile_started)
        self.goodput.add("takeover_s", finished - started)
        if self.metrics is not None:
            self.metrics.append(event)
            print(f"lite-tp: device {failed.id} failed at step {step}; spare device {takeover.event.get('spare')} "
                  f"took its place in {event['seconds']:.1f} s (spare_takeover in metrics.jsonl)", file=sys.stderr, flush=True)

    def run(self, *, show_progress: bool = True) -> list[dict]:
        """Trains from the resumed step to ``train.steps``; returns this run's
        metrics. Stops early, after a checkpoint, when preempted (SIGTERM)."""
        try:
            with PreemptionWatch() as preemption:
                while True:
                    try:
                        self._run(preemption, show_progress)
                        return self.records
                    except RollBack as rollback:
                        self.divergence.roll_back(rollback.spike, self)
        finally:
            with self.goodput.measure("checkpoint_s"):
                self.close()
            self._finish_logs()

    def _finish_logs(self) -> None:
        """The profiler stopped, the ``goodput`` event (with the compiled step's
        figures) logged, the sinks closed."""
        self.trace.stop(self.last_step)
        if self.metrics is None:
            return
        if self.start_step < self.config.train.steps:  # a run that had steps to do
            event = self.goodput.event(self.last_step, self.metrics.path)
            self.metrics.append({**event, **self.compiled, "flops_per_step": self.cost.flops})
            self.goodput_line = summary(event)
        self.metrics.close()

    def _compile_first_step(self) -> None:
        """Before step 1: the step compiled (or loaded from the compilation cache),
        its memory per device and model FLOPs printed (and, by process 0, logged with the goodput)."""
        with self.goodput.measure("compile_s"):
            self.compiled = compile_step(self.step, self.batches.batch(self.start_step), self.mesh)
        # Every process: whether the cache served it is per process (``runtime/compile_cache.py``).
        who = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
        print(who + describe(self.compiled, self.goodput.seconds["compile_s"], self.cost), flush=True)

    def _run(self, preemption: PreemptionWatch, show_progress: bool) -> list[dict]:
        train, every = self.config.train, self.config.checkpoint.every
        records = self.records
        if self.start_step < train.steps and not self.compiled:
            self._compile_first_step()
        progress = Progress(
            TextColumn("step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tokens_per_s]:,.0f} tok/s"),
            TimeRemainingColumn(), disable=not (show_progress and is_primary() and self.start_step < train.steps),
        )
        with progress:
            task = progress.add_task("train", total=train.steps, completed=self.start_step, loss=float("nan"), tokens_per_s=0.0)
            for position in range(self.start_step, train.steps):
                failed = self.spares.failing_before(position + 1)
                if failed is not None:  # an injected device failure: a spare takes over
                    self._take_over(failed, position + 1)
                with self.goodput.measure("data_s"):
                    batch = device_batch(self.batches, self.divergence.position(position), batch_sharding(self.mesh))
                self.trace.before(position + 1)
                started = time.perf_counter()
                metrics = jax.device_get(self.injected_spike.run(position + 1, self.model, lambda: self.step(tuple(batch))))
                elapsed = time.perf_counter() - started
                self.trace.after(position + 1)
                self.last_step = position + 1
                record = {
                    "step": position + 1,
                    **{name: float(value) for name, value in metrics.items()},
                    "step_time_s": elapsed,
                    **self.cost.rates(elapsed),
                }
                self.goodput.add("skipped_step_s" if record["skipped"] else "productive_step_s", elapsed)
                if (memory := device_memory_in_use()) is not None:
                    record["memory_in_use_bytes"] = memory
                self.divergence.observe(record, self)
                self.skipped_steps += int(record["skipped"])
                record["skipped_steps"] = self.skipped_steps
                if self.metrics is not None:
                    self.metrics.append(record)
                records.append(record)
                progress.update(task, completed=position + 1, loss=record["loss"], tokens_per_s=record["tokens_per_s"])
                if preemption.reached(position + 1):
                    self._save(position + 1, record["loss"])
                    self.preempted_at, self.stopped_by = position + 1, preemption.signal_name
                    break
                self.checkpointer.check()  # a save in flight that failed stops the run here
                if (position + 1) % every == 0 or position + 1 == train.steps:
                    self._save(position + 1, record["loss"])
        return records
