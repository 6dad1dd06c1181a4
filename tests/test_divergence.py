"""A run that diverges is never lost (train/divergence.py): spike detection,
suspect checkpoints set aside, rollback past the spike, --resume-step, and
the checkpoint listing.

The runs (tensor 2, deterministic reductions, so a 2-process launch gives
the same bits as one process):

* A: a spike injected at step 5 (fault.spike_step, lr x 1e4), train.on_spike=rollback;
* B: A's checkpoint 4 (the one A rolled back to) resumed by hand
  (``--resume-step 4 --skip-batches 2``), skipping the batches A skipped.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from lite_tp_jax import export_state
from lite_tp_jax.cli import main
from lite_tp_jax.train.divergence import DataSkips, Spike, SpikeDetector, rollback_target, skip_after_rollback

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
RUN = ["mesh.tensor=8", "train.deterministic=true", "train.steps=8", "train.warmup_steps=1",
       "checkpoint.every=2", "checkpoint.keep=4"]
SPIKE = [*RUN, "fault.spike_step=5"]  # step 5's lr x 1e4: step 6's loss spikes


def train(run_dir, *overrides, args=()) -> tuple[int, str]:
    """``lite-tp train`` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", TINY, "--no-progress", "--run-dir", str(run_dir), *args, "--set", *overrides])
    return code, err.getvalue()


def lines(run_dir, name="metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / name).read_text().splitlines()]


def steps(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in lines(run_dir) if "event" not in r}


def events(run_dir, kind) -> list[dict]:
    return [r for r in lines(run_dir) if r.get("event") == kind]


def parameters(run_dir, step=None) -> dict[str, np.ndarray]:
    from lite_tp_jax.inference.loading import load_trained_model

    return {k: np.asarray(v) for k, v in export_state(load_trained_model(run_dir, step=step)).items()}


def assert_same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---- the pieces, without a model ------------------------------------------------


def record(step, loss, skipped=0, grad_norm=1.0):
    return {"step": step, "loss": loss, "grad_norm": grad_norm, "skipped": skipped}


def test_detector_compares_with_the_median_of_the_last_finite_losses():
    detector = SpikeDetector(window=3, factor=3.0)
    assert [detector.observe(record(s, x)) for s, x in [(1, 6.0), (2, 1.0), (3, 2.0), (4, 5.9)]] == [None] * 4
    # the window holds 1, 2, 5.9: median 2, so 6.1 is above 3x it; the first loss fell out
    spike = detector.observe(record(5, 6.1))
    assert (spike.step, spike.start, spike.suspect_from, spike.non_finite, spike.median) == (5, 5, 4, False, 2.0)
    assert "3.05x the median 2" in spike.what
    # a NaN gradient 2 steps later continues the episode; the spike still started at 5
    spike = detector.observe(record(7, 2.0, skipped=1, grad_norm=math.nan))
    assert (spike.step, spike.start, spike.suspect_from, spike.non_finite, spike.what) == (7, 5, 4, True, "grad_norm is nan")
    # more than a window later: a new episode; an update gone non-finite from a finite
    # loss and gradient makes only the state after its own step suspect
    for s in range(8, 12):
        assert detector.observe(record(s, 2.0)) is None
    spike = detector.observe(record(12, 2.0, skipped=1))
    assert (spike.start, spike.suspect_from) == (12, 12) and spike.what.startswith("the update made parameters")
    # null factor: no loss spikes, non-finite steps still; under skip, not those either
    off = SpikeDetector(window=3, factor=None)
    assert off.observe(record(1, 1.0)) is None and off.observe(record(2, 1e9)) is None
    assert off.observe(record(3, math.inf, skipped=1)).non_finite
    assert off.observe(record(4, math.inf, skipped=1), count_non_finite=False) is None
    restored = SpikeDetector(window=3, factor=3.0)
    restored.load(detector.state())
    assert list(restored.losses) == list(detector.losses) and restored.episode == detector.episode


def test_the_batch_of_a_step_is_a_pure_function_of_the_skips():
    skips = DataSkips([[4, 2]])
    assert [skips.position(p) for p in range(7)] == [0, 1, 2, 3, 6, 7, 8]
    skips.add(6, 3)
    assert [skips.position(p) for p in range(4, 8)] == [6, 7, 11, 12]


def test_rollback_goes_to_the_newest_checkpoint_before_the_suspect_ones():
    spike = Spike(step=9, start=7, suspect_from=6, non_finite=True, what="", loss=1.0, median=1.0)
    assert rollback_target([2, 4, 6, 8], spike, steps_before=0) == 4
    assert rollback_target([2, 4, 6, 8], spike, steps_before=4) == 2
    assert rollback_target([6, 8], spike, steps_before=0) == 0  # none before: the initial state
    # null skip: past the spike start's batch (step 7 read batch 6), i.e. batches 4, 5, 6
    assert skip_after_rollback(None, spike, DataSkips(), DataSkips(), 4) == 3
    # a second rollback to the same checkpoint skips past the first one's batches too
    assert skip_after_rollback(2, spike, DataSkips([[4, 3]]), DataSkips(), 4) == 5


def test_checkpoints_taken_within_a_spike_episode_are_marked_suspect():
    """Under train.on_spike=ignore the run goes on; a checkpoint taken within
    spike_window steps of the last spike records the spike start."""
    from lite_tp_jax.run.config_file import parse_config
    from lite_tp_jax.train.divergence import Divergence

    divergence = Divergence(parse_config({}, ["train.spike_window=3", "train.on_spike=ignore"]))
    suspect_since = []
    for step, loss in [(1, 2.0), (2, 2.0), (3, 9.0), (4, 2.0), (5, 2.0), (6, 2.0), (7, 2.0)]:
        divergence.detector.observe(record(step, loss))
        suspect_since.append(divergence.progress(step)["suspect_since"])
    assert suspect_since == [None, None, 3, 3, 3, 3, None]


def test_a_restart_does_not_go_back_to_the_resume_step_again(tmp_path):
    """`lite-tp launch --max-restarts` reruns the worker's command: once the
    run logged its resume, --resume-step and --skip-batches are dropped."""
    from lite_tp_jax.runtime.restart import once_resumed

    metrics = tmp_path / "metrics.jsonl"
    argv = ["python", "-m", "lite_tp_jax.cli", "train", "c.yaml", "--resume-step", "4", "--skip-batches=2", "--no-progress"]
    assert once_resumed(argv, metrics) == argv  # the first attempt failed before resuming
    metrics.write_text(json.dumps({"event": "resume", "step": 2}) + "\n")
    assert once_resumed(argv, metrics) == argv  # an earlier resume, to another step
    metrics.write_text(json.dumps({"event": "resume", "step": 4, "skip_batches": 2}) + "\n")
    assert once_resumed(argv, metrics) == ["python", "-m", "lite_tp_jax.cli", "train", "c.yaml", "--no-progress"]


# ---- the new user's try (issue 22) ------------------------------------------------


def test_a_blown_up_run_reruns_with_a_lower_learning_rate_as_the_message_says(tmp_path):
    """lr 1e4: step 3's loss is 1.6e6, made by step 2's update, so checkpoint 2
    is suspect; it is set aside and the same command with lr 1e-3 trains all
    12 steps from a fresh start, its losses finite and falling."""
    run = tmp_path / "R"
    command = ["train.steps=12", "train.grad_clip=1e9", "checkpoint.every=2"]
    code, err = train(run, *command, "train.lr=1e4")
    assert code == 4 and err.count("\n") == 1, err
    assert "step 3: loss 1.645e+06 is" in err and "(train.on_spike=stop)" in err
    assert "checkpoint 2 holds its state and is set aside (not deleted)" in err
    assert "rerunning with a lower train.lr starts afresh from step 0" in err
    (aside,) = (run / "checkpoints").iterdir()
    assert aside.name.startswith("2.suspect-")
    spike = events(run, "spike")[0]
    assert (spike["step"], spike["start"], spike["suspect_from"], spike["policy"]) == (3, 3, 2, "stop")

    code, err = train(run, *command, "train.lr=1e-3")
    assert code == 0, err
    losses = steps(run)
    assert sorted(losses) == list(range(1, 13)) and all(math.isfinite(x) for x in losses.values())
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (10, 11, 12)])
    assert last < first - 0.5, losses

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["checkpoints", str(run)]) == 0
    rows = [line.split() for line in out.getvalue().splitlines()]
    assert rows[0] == ["step", "saved", "loss", "state", "set", "aside", "suspect"]
    assert rows[1][0] == "2" and rows[1][4:6] == ["intact", "suspect"] and rows[1][6:] == ["yes", "(spike", "at", "step", "3)"]
    (aside,) = run.glob("metrics.set-aside-*.jsonl")  # the first try's steps 1 and 2, kept
    assert [r["step"] for r in lines(run, aside.name)] == [1, 2]
    assert rows[1][3] == f"{lines(run, aside.name)[1]['loss']:.4f}"
    assert [r[0] for r in rows[2:]] == ["10", "12"] and all(r[4:] == ["intact", "no", "no"] for r in rows[2:])

    # rollback instead: no checkpoint before the spike, so back to the initial state (drawn from the
    # seed again), batches 0..2 skipped; at the same lr it spikes again and rollback.max=1 stops it
    again = tmp_path / "again"
    code, err = train(again, *command, "train.lr=1e4", "train.on_spike=rollback", "rollback.max=1")
    assert code == 4 and "(train.on_spike=rollback, after 1 rollbacks (rollback.max))" in err, err
    (rollback,) = events(again, "rollback")
    assert (rollback["checkpoint"], rollback["skipped_batches"], rollback["set_aside"]) == (None, [0, 3], [2])
    assert [e["step"] for e in events(again, "spike")] == [3, 3]
    lineages = [lines(again, p.name) for p in sorted(again.glob("metrics.set-aside-*.jsonl"))]
    restarted = [r for lineage in lineages for r in lineage if r["step"] == 1]
    assert len(restarted) == 2 and abs(restarted[1]["loss"] - restarted[0]["loss"]) < 0.5  # fresh weights on batch 3 (the dead state: 5.545)

    err = io.StringIO()  # a step that is not there: one line, exit 2, before any model is built
    with contextlib.redirect_stderr(err):
        assert main(["generate", "--run-dir", str(run), "--step", "4", "--prompt", "x"]) == 2
        assert main(["checkpoints", str(tmp_path)]) == 2
    assert err.getvalue().splitlines() == [
        f"lite-tp: error: There is no checkpoint 4 in {run / 'checkpoints'}; it holds 2, 10, 12.",
        f"lite-tp: error: No checkpoint directory in {tmp_path}; `lite-tp checkpoints` takes a run directory.",
    ]


# ---- rollback against resuming by hand; --resume-step; launch -------------------------
# One test (one xdist worker): the runs build on each other.


def test_rollback_equals_resuming_by_hand_in_one_process_and_under_launch(tmp_path):
    a, b = tmp_path / "rollback", tmp_path / "by-hand"
    code, err = train(a, *SPIKE, "train.on_spike=rollback")
    assert code == 0, err
    # by hand: A's checkpoint 4 (taken before the spike) resumed, skipping the 2 batches A skipped
    shutil.copytree(a / "checkpoints" / "4", b / "checkpoints" / "4")
    code, err = train(b, *RUN, args=["--resume-step", "4", "--skip-batches", "2"])
    assert code == 0, err

    (rollback,) = events(a, "rollback")
    assert {k: rollback[k] for k in ("step", "spike_start", "checkpoint", "skipped_batches", "data_skips", "set_aside")} == {
        "step": 4, "spike_start": 6, "checkpoint": 4, "skipped_batches": [4, 6], "data_skips": [[4, 2]], "set_aside": []}
    assert rollback["seconds_lost"] > 0 and rollback["steps_redone"] == 2
    assert [(e["step"], e["start"], e["policy"]) for e in events(a, "spike")] == [(6, 6, "rollback")]
    (resume,) = events(b, "resume")
    assert (resume["step"], resume["data_skips"]) == (4, [[4, 2]])
    # each step logged once; the abandoned step 5 (batch 4) is set aside, not lost
    assert list(steps(a)) == list(range(1, 9)) and steps(b) == {s: steps(a)[s] for s in range(5, 9)}
    (aside,) = a.glob("metrics.set-aside-*.jsonl")
    assert [r["step"] for r in lines(a, aside.name)] == [5]
    assert lines(a, aside.name)[0]["loss"] != steps(a)[5]  # redone on batch 6
    assert_same_bits(parameters(a), parameters(b))

    check_resume_step(a, tmp_path / "resumed")
    check_launch(a, b, tmp_path / "two")


def check_resume_step(a: Path, c: Path) -> None:
    """--resume-step 4 sets 6 and 8 aside, and metrics lines 5..8 (B showed
    that the steps after it are exact); the set-aside 8 is still readable,
    and --resume-step 8 brings it back, with its metrics lines."""
    from lite_tp_jax.run.config_file import load_config
    from lite_tp_jax.train.loop import Trainer

    shutil.copytree(a, c)
    Trainer(load_config(TINY, RUN), c, resume_step=4).close()  # resumed at 4, then stopped at once
    names = sorted(p.name for p in (c / "checkpoints").iterdir())
    assert [n.split(".")[0] for n in names] == ["2", "4", "6", "8"] and all(".set-aside-" in n for n in names[2:])
    assert list(steps(c)) == [1, 2, 3, 4]
    assert_same_bits(parameters(c, step=8), parameters(a))  # a set-aside checkpoint is still readable

    trainer = Trainer(load_config(TINY, RUN), c, resume_step=8)
    assert trainer.start_step == 8 and trainer.divergence.skips.skips == [(4, 2)]
    assert trainer.run(show_progress=False) == []  # all 8 steps done
    assert sorted(p.name for p in (c / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4", "8"]
    assert steps(c) == steps(a)  # each step once, in metrics.jsonl again
    assert_same_bits(parameters(c), parameters(a))


def check_launch(a: Path, b: Path, run: Path) -> None:
    """`lite-tp launch --processes 2`: both processes see the spike, roll back
    together and finish with the bits of the run resumed by hand in one process."""
    result = subprocess.run(
        [sys.executable, "-m", "lite_tp_jax.cli", "launch", "--processes", "2", "--", "train", TINY, "--run-dir", str(run),
         "--no-progress", "--set", *SPIKE, "train.on_spike=rollback"], capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (rollback,) = events(run, "rollback")
    assert (rollback["checkpoint"], rollback["skipped_batches"]) == (4, [4, 6])
    assert steps(run) == steps(a)
    assert_same_bits(parameters(run), parameters(b))
