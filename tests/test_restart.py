"""Abort and restart (``lite-tp launch --max-restarts``): a dead process or a
hang restarts the whole job from its checkpoint, each step is recorded once and
each restart once as an event; bad input is not retried; restarts run out.

The workers here are a small script that behaves like ``lite-tp train`` on a run
directory (checkpoint every 2 steps, resume rewrites metrics.jsonl); the real
trainer under a real kill is exercised by benchmarks/fault_injection.py."""

import json
import sys
import textwrap

import pytest

from lite_tp_jax.cli import main
from lite_tp_jax.runtime.restart import supervise

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    run, mode = sys.argv[1], sys.argv[2]
    rank = int(os.environ["LITE_TP_PROCESS_ID"])
    counter = os.path.join(run, f"attempt-{rank}")
    attempt = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
    open(counter, "w").write(str(attempt))
    metrics = os.path.join(run, "metrics.jsonl")
    start = 0
    if attempt > 1:  # resume from the checkpoint of step 2: later lines go
        start = 2
        if rank == 0:
            lines = [l for l in open(metrics).read().split("\\n") if l]
            kept = [l for l in lines if "event" in json.loads(l) or json.loads(l)["step"] <= 2]
            open(metrics, "w").write("".join(l + "\\n" for l in kept))
    if mode == "nan":
        print("lite-tp: error: step 3: grad_norm is nan (train.on_nonfinite=stop)", file=sys.stderr)
        sys.exit(4)
    if mode == "bad":
        print("lite-tp: error: 'train.steps' must be an integer >= 1, got 0", file=sys.stderr)
        sys.exit(2)
    for step in range(start + 1, 6):
        time.sleep(0.2)
        if rank == 1 and step == 4 and (mode == "always" or (mode == "die" and attempt == 1)):
            print("worker 1 lost its device", file=sys.stderr)
            os._exit(1)
        if mode == "hang" and attempt == 1 and step == 4:
            time.sleep(1000)
        if mode == "preempt" and step == 3:  # both save step 3 and exit 143; rank 0 takes longer
            time.sleep(0.5 if rank == 0 else 0)
            open(os.path.join(run, f"saved-{rank}"), "w").close()
            sys.exit(143)
        if rank == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps({"step": step, "loss": 1.0 / step, "time": time.time()}) + "\\n")
    """
)


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return [sys.executable, str(path)]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_dead_process_restarts_the_job_and_each_step_is_recorded_once(tmp_path, worker, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert supervise([str(run), "die"], 2, 1, run, max_restarts=2, argv_prefix=worker) == 0
    lines = records(run)
    assert [r["step"] for r in lines if "event" not in r] == [1, 2, 3, 4, 5]
    (event,) = [r for r in lines if "event" in r]
    assert event["event"] == "restart" and event["rank"] == 1 and event["restart"] == 1
    assert "process 1 exited with code 1: worker 1 lost its device" in event["cause"]
    assert event["step"] >= 4 and event["seconds_to_first_step"] > 0  # rank 0 does not wait for rank 1
    assert "restart 1/2 from the last checkpoint" in capsys.readouterr().err
    assert "worker 1 lost its device" in (run / "logs" / "rank-1.log").read_text()  # attempt 0's log kept
    assert (run / "logs" / "rank-1.attempt-1.log").exists()


def test_a_hang_restarts_the_job(tmp_path, worker):
    run = tmp_path / "run"
    run.mkdir()
    assert supervise([str(run), "hang"], 2, 1, run, max_restarts=1, hang_timeout=1.0, argv_prefix=worker) == 0
    lines = records(run)
    assert [r["step"] for r in lines if "event" not in r] == [1, 2, 3, 4, 5]
    (event,) = [r for r in lines if "event" in r]
    assert event["rank"] is None and "no training step completed in 1 s (hang)" in event["cause"]


def test_restarts_run_out(tmp_path, worker, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert supervise([str(run), "always"], 2, 1, run, max_restarts=1, argv_prefix=worker) == 1
    assert (run / "attempt-1").read_text() == "2"
    assert "giving up after 1 restart(s)" in capsys.readouterr().err


def test_bad_input_is_not_retried(tmp_path, worker):
    run = tmp_path / "run"
    run.mkdir()
    assert supervise([str(run), "bad"], 2, 1, run, max_restarts=3, argv_prefix=worker) == 2
    assert (run / "attempt-0").read_text() == "1"


def test_a_preempted_job_is_not_retried_and_every_process_finishes_its_save(tmp_path, worker, capsys):
    """Exit 143 is a preemption checkpoint, not a failure: the process still
    saving is not killed, and the launch exits 143 for the scheduler to rerun it."""
    run = tmp_path / "run"
    run.mkdir()
    assert supervise([str(run), "preempt"], 2, 1, run, max_restarts=3, argv_prefix=worker) == 143
    assert (run / "attempt-0").read_text() == "1" and (run / "saved-0").exists() and (run / "saved-1").exists()
    assert "preempted (SIGTERM)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [(["--max-restarts", "-1"], "--max-restarts must be at least 0, got -1"),
     (["--hang-timeout", "0"], "--hang-timeout must be a positive number of seconds, got 0.0")],
)
def test_bad_restart_flags_exit_2(flags, message, tmp_path, capsys):
    argv = ["launch", "--processes", "2", *flags, "--", "train", "configs/tiny.yaml", "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_non_finite_stop_is_not_restarted(tmp_path, worker, capsys):
    """Exit 4: the same checkpoint and batches would meet the same NaN."""
    run = tmp_path / "run"
    run.mkdir()
    assert supervise([str(run), "nan"], 2, 1, run, max_restarts=3, argv_prefix=worker) == 4
    assert (run / "attempt-0").read_text() == "1"
    assert "not restarted: the run stopped on a non-finite value" in capsys.readouterr().err
