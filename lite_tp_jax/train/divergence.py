"""A run that diverges is never lost: loss spikes, suspect checkpoints, and
rolling back past the spike with the batches around it skipped.

Detection (``SpikeDetector``). Step t's loss is compared with the median of
the last ``train.spike_window`` finite losses: above ``train.spike_factor``
times that median (null: never), or non-finite (a NaN or infinite loss,
gradient norm or updated parameter, ``skipped`` in the step's metrics), it is
a spike. A spike within ``spike_window`` steps of the previous one continues
its episode; the episode's first step is the *spike start*. Every spike is a
``spike`` event in ``metrics.jsonl`` (a non-finite step under
``on_nonfinite: skip`` is not: its update was dropped, and it is counted).

Which checkpoints are suspect. Step t's loss and gradient are computed on the
parameters left by step t-1, so a spike in the loss or the gradient norm at
step t makes checkpoint t-1 suspect already (the issue's example: the loss of
step 3 is 1.6e6 because of step 2's update, so checkpoint 2 is not healthy);
an update that turns the parameters non-finite from a finite loss and
gradient makes checkpoint t suspect. Checkpoints from that step on get
``lite_tp_suspect.json`` (``run/checkpoint.py``).

What happens (``train.on_spike``: stop | rollback | ignore for a loss spike,
``train.on_nonfinite``: stop | skip | rollback for a non-finite step):

* ``stop``: the suspect checkpoints are set aside (renamed, not deleted) and
  the run ends with one line naming them and the step that rerunning the same
  command (with a lower ``train.lr``) resumes from (``SpikeStop``, exit 4: ``lite-tp launch --max-restarts`` never restarts it).
* ``rollback``: reload the newest checkpoint at least ``rollback.steps_before``
  steps before the spike start that is not suspect (none: the initial state,
  step 0), set every later checkpoint aside and move the later metrics lines
  aside, skip batches (below) and go on; a ``rollback`` event records it. At
  most ``rollback.max`` times per ``lite-tp train``, then ``stop``. Every
  process of a multi-process run sees the same (replicated) losses, so all
  take the same decisions and roll back together.
* ``ignore``: only the event.

Skipped batches (``DataSkips``). The batch a step reads stays a pure function
of (seed, step, skips): step p+1 reads batch ``p + sum(n for (after, n) in
skips if after <= p)``. A skip ``(c, n)`` ("after step c, skip n batches") is
recorded in every later checkpoint's progress (``data_skips``) and in the
event, so a resume after a rollback reads exactly the same batches. A
rollback to checkpoint c skips ``rollback.skip_batches`` batches past those
the abandoned steps had reached after c (null: every batch up to and
including the spike start's); ``lite-tp train --resume-step c --skip-batches
n`` does the same by hand.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from flax import nnx

from lite_tp_jax.run.checkpoint import NonFiniteError
from lite_tp_jax.run.config import Config
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.runtime.metrics import set_aside_records


class SpikeStop(NonFiniteError):
    """The run stopped on a spike (a non-finite step or a loss spike); exit 4, one line."""


@dataclass(frozen=True)
class Spike:
    """A spike seen at ``step``, in an episode that began at ``start``; the
    checkpoints from ``suspect_from`` on hold a state it came from."""

    step: int
    start: int
    suspect_from: int
    non_finite: bool
    what: str  # "loss 1.645e+06 is 255x the median 6.45 of the last 2 finite losses", "grad_norm is nan"
    loss: float
    median: float | None

    def event(self, policy: str) -> dict[str, Any]:
        return {"event": "spike", **asdict(self), "policy": policy}

    def policy(self, config: Config) -> str:
        """What the run does about it: stop | rollback | ignore | skip."""
        return config.train.on_nonfinite if self.non_finite else config.train.on_spike

    def setting(self) -> str:
        return "train.on_nonfinite" if self.non_finite else "train.on_spike"


def _non_finite_what(record: dict) -> str:
    return next(
        (f"{name} is {record[name]}" for name in ("loss", "grad_norm") if not math.isfinite(record[name])),
        f"the update made parameters non-finite (loss {record['loss']:.4g}, grad_norm {record['grad_norm']:.4g})",
    )


class SpikeDetector:
    """Median of the last ``window`` finite losses; a spike above ``factor`` x it
    (``factor`` None: loss spikes off) or a non-finite step; episodes of spikes
    closer than ``window`` steps. Its state travels in checkpoints (``state``)."""

    def __init__(self, window: int, factor: float | None):
        self.window, self.factor = window, factor
        self.losses: deque[float] = deque(maxlen=window)
        self.episode: list[int] | None = None  # [start, suspect_from, last spike step]

    def observe(self, record: dict, *, count_non_finite: bool = True) -> Spike | None:
        step, loss = record["step"], record["loss"]
        median = statistics.median(self.losses) if self.losses else None
        spike = None
        if record["skipped"] and count_non_finite:
            what = _non_finite_what(record)
            measured = math.isfinite(loss) and math.isfinite(record["grad_norm"])  # only the update went wrong
            spike = (step, step if measured else step - 1, True, what)
        elif self.factor is not None and median is not None and math.isfinite(loss) and loss > self.factor * median:
            what = (f"loss {loss:.4g} is {loss / median:.3g}x the median {median:.4g} of the last "
                    f"{len(self.losses)} finite losses (train.spike_factor={self.factor:g})")
            spike = (step, step - 1, False, what)
        if math.isfinite(loss) and not record["skipped"]:
            self.losses.append(loss)
        if spike is None:
            return None
        step, suspect_from, non_finite, what = spike
        if self.episode is None or step - self.episode[2] > self.window:
            self.episode = [step, suspect_from, step]
        self.episode = [self.episode[0], min(self.episode[1], suspect_from), step]
        return Spike(step, self.episode[0], self.episode[1], non_finite, what, loss, median)

    def state(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "episode": self.episode}

    def load(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.losses = deque(state.get("losses", []), maxlen=self.window)
        self.episode = state.get("episode")


class DataSkips:
    """The batches a run skips: ``(after_step, count)`` pairs, in order."""

    def __init__(self, skips: list | None = None):
        self.skips = [(int(after), int(count)) for after, count in skips or []]

    def position(self, position: int) -> int:
        """The batch read by step ``position + 1``."""
        return position + sum(count for after, count in self.skips if after <= position)

    def add(self, after_step: int, count: int) -> None:
        if count:
            self.skips.append((after_step, count))


def rollback_target(steps: list[int], spike: Spike, steps_before: int) -> int:
    """The newest of ``steps`` that is not suspect and at least ``steps_before``
    before the spike start; 0 (the initial state) when none is."""
    limit = min(spike.suspect_from - 1, spike.start - steps_before)
    return max((s for s in steps if s <= limit), default=0)


def skip_after_rollback(skip_batches: int | None, spike: Spike, abandoned: DataSkips, restored: DataSkips,
                        target: int) -> int:
    """Batches to skip after rolling back to ``target``: ``skip_batches`` past
    the batch the abandoned run read after ``target`` (null: past the spike
    start's batch), counted from the restored checkpoint's next batch."""
    first = abandoned.position(spike.start - 1) + 1 if skip_batches is None else abandoned.position(target) + skip_batches
    return max(first - restored.position(target), 0)


def stop_message(spike: Spike, record: dict, config: Config, set_aside: list[int], resume_from: int | None,
                 aside_dir: str, rollbacks: int = 0) -> str:
    """The one line a run stopped on a spike ends with: what, where it started,
    what was set aside, and the step rerunning resumes from."""
    setting, policy = spike.setting(), spike.policy(config)
    why = f"{setting}=rollback, after {rollbacks} rollbacks (rollback.max)" if rollbacks else f"{setting}={policy}"
    what = _non_finite_what(record) if spike.non_finite else spike.what
    text = f"step {spike.step}: {what} ({why})"
    if spike.start != spike.step:
        text += f"; the spike started at step {spike.start}"
    if set_aside:
        which = (f"checkpoint {set_aside[0]} holds its state and is" if len(set_aside) == 1 else
                 f"checkpoints {', '.join(map(str, set_aside))} hold its state and are")
        text += f"; {which} set aside (not deleted) in {aside_dir}"
    if resume_from is not None:
        text += f"; checkpoint {resume_from} is intact: rerunning with a lower train.lr resumes from step {resume_from}"
    else:
        text += "; no checkpoint before it: rerunning with a lower train.lr starts afresh from step 0"
    if rollbacks:
        return f"{text}, or raise rollback.skip_batches (or rollback.max) to go further past the spike."
    hint = "train.on_nonfinite=rollback (or skip)" if spike.non_finite else "train.on_spike=rollback"
    return f"{text}, or set {hint} to go back past such spikes automatically."


class RollBack(Exception):
    """Raised out of the step loop to roll back past ``spike``."""

    def __init__(self, spike: Spike):
        self.spike = spike


class Divergence:
    """A run's spike detector, the batches it skips and its rollbacks; the
    training loop's hooks (``train/loop.py``): ``position`` (the batch of a
    step), ``progress`` (for checkpoints), ``restore`` (from one), ``observe``
    (each step record) and ``roll_back``."""

    def __init__(self, config: Config):
        self.config = config
        self.detector = SpikeDetector(config.train.spike_window, config.train.spike_factor)
        self.skips = DataSkips()
        self.rollbacks = 0

    def position(self, position: int) -> int:
        return self.skips.position(position)

    def progress(self, step: int) -> dict[str, Any]:
        """For a checkpoint of ``step``: the next batch, the skips, the detector,
        and the spike start when taken within a spike's episode (suspect)."""
        episode = self.detector.episode
        open_spike = episode is not None and step - episode[2] <= self.detector.window
        return {"data_position": self.skips.position(step), "data_skips": self.skips.skips,
                "spike_detector": self.detector.state(), "suspect_since": episode[0] if open_spike else None}

    def restore(self, progress: dict) -> None:
        self.skips = DataSkips(progress.get("data_skips"))
        self.detector.load(progress.get("spike_detector"))

    def observe(self, record: dict, trainer) -> None:
        """A step's record: on a spike, its event, then what its policy says:
        mark the checkpoints from its state suspect, and stop (SpikeStop, the
        suspect ones and the metrics lines a rerun redoes set aside) or roll
        back (``RollBack``, handled by ``roll_back``)."""
        spike = self.detector.observe(record, count_non_finite=self.config.train.on_nonfinite != "skip")
        if spike is None:
            return
        policy, checkpointer = spike.policy(self.config), trainer.checkpointer
        if trainer.metrics is not None:
            trainer.metrics.append(spike.event(policy))
        if policy in ("ignore", "skip"):
            return
        checkpointer.wait()
        suspect = [s for s in checkpointer.all_steps() if s >= spike.suspect_from]
        checkpointer.mark_suspect(suspect, spike.event(policy))
        if policy == "rollback" and self.rollbacks < self.config.rollback.max:
            raise RollBack(spike)
        checkpointer.set_aside(suspect, "suspect")
        resume_from = max((s for s in checkpointer.all_steps() if checkpointer.intact(s)), default=None)
        if trainer.metrics is not None:
            set_aside_records(trainer.metrics.path, resume_from or 0)
        raise SpikeStop(stop_message(spike, record, self.config, suspect, resume_from, str(checkpointer.directory),
                                     self.rollbacks))

    def roll_back(self, spike: Spike, trainer) -> None:
        """Back to the newest checkpoint before the spike (``rollback_target``;
        none: the initial state, drawn as a fresh run draws it), the later
        checkpoints and metrics lines set aside, batches skipped; one
        ``rollback`` event. Every process does the same (the checkpointer
        moves files from process 0)."""
        started = time.perf_counter()
        checkpointer, abandoned = trainer.checkpointer, self.skips
        intact = [s for s in checkpointer.all_steps() if checkpointer.intact(s)]
        target = rollback_target(intact, spike, self.config.rollback.steps_before)
        later = [s for s in checkpointer.all_steps() if s > target]
        checkpointer.set_aside([s for s in later if s < spike.suspect_from], "set-aside")
        checkpointer.set_aside([s for s in later if s >= spike.suspect_from], "suspect")
        if target:
            progress = checkpointer.restore(trainer._items(), trainer.mesh, step=target)
        else:
            model, optimizer = create_model_and_optimizer(self.config.model, self.config.train, trainer.mesh)
            nnx.update(trainer.model, nnx.state(model))
            nnx.update(trainer.optimizer, nnx.state(optimizer))
            progress = {"step": 0}
        trainer.take_up(progress)
        skipped = skip_after_rollback(self.config.rollback.skip_batches, spike, abandoned, self.skips, target)
        self.skips.add(target, skipped)
        self.rollbacks += 1
        redone = [r for r in trainer.records if r["step"] > target]
        trainer.records[:] = [r for r in trainer.records if r["step"] <= target]
        if trainer.metrics is not None:
            set_aside_records(trainer.metrics.path, target)
            first = self.skips.position(target)
            trainer.metrics.append({
                "event": "rollback", "step": target, "spike_start": spike.start, "spike_step": spike.step,
                "checkpoint": target or None, "skipped_batches": [first - skipped, first], "data_skips": self.skips.skips,
                "set_aside": later, "rollback": self.rollbacks, "steps_redone": spike.step - target,
                "seconds_lost": sum(r["step_time_s"] for r in redone) + time.perf_counter() - started,
            })
