"""Several processes, one mesh: the hybrid mesh layout, the launcher's
supervision, and whole training runs across processes against one process.

Multi-process runs are slow (every process compiles the step), so there are
three launches in all, each covering several checks.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lite_tp_jax import cli
from lite_tp_jax.runtime.launch import free_port, run_processes, worker_environment
from lite_tp_jax.core.mesh import device_grid, split_over_processes
from lite_tp_jax.runtime.devices import use_deterministic_gpu_ops

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


# --- the mesh over hosts ----------------------------------------------------------


@dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def hosts(processes: int, per_process: int) -> list[FakeDevice]:
    """Devices as JAX numbers them on a cluster: process k's ids start at k * 2048."""
    return [FakeDevice(k * 2048 + i, k) for k in range(processes) for i in range(per_process)]


def test_two_hosts_of_four_keep_tensor_inside_a_host():
    grid = device_grid((2, 1, 1, 1, 1, 4), hosts(2, 4))  # data 2 x tensor 4
    assert [[d.process_index for d in row] for row in grid.reshape(2, 4)] == [[0, 0, 0, 0], [1, 1, 1, 1]]
    assert [[d.id for d in row] for row in grid.reshape(2, 4)] == [[0, 1, 2, 3], [2048, 2049, 2050, 2051]]
    grid = device_grid((1, 2, 1, 1, 1, 4), hosts(2, 4))  # pipeline 2 x tensor 4: stages across hosts
    assert [[d.process_index for d in row] for row in grid.reshape(2, 4)] == [[0, 0, 0, 0], [1, 1, 1, 1]]
    grid = device_grid((4, 1, 1, 1, 1, 2), hosts(2, 4))  # data 4 x tensor 2: two data ranks per host
    assert [[d.id for d in row] for row in grid.reshape(4, 2)] == [[0, 1], [2, 3], [2048, 2049], [2050, 2051]]


def test_tensor_wider_than_a_host_spans_neighbouring_hosts():
    grid = device_grid((2, 1, 1, 1, 1, 4), hosts(4, 2))
    assert [[d.process_index for d in row] for row in grid.reshape(2, 4)] == [[0, 0, 1, 1], [2, 2, 3, 3]]
    assert split_over_processes((2, 1, 1, 1, 1, 4), 2) == ((1, 1, 1, 1, 1, 2), (2, 1, 1, 1, 1, 2))


def test_mesh_that_cannot_fill_hosts_is_a_clear_error():
    with pytest.raises(ValueError, match=r"data=2 x pipeline=1 x expert=1 x fsdp=1 x context=1 x tensor=3 cannot be laid over processes of 4"):
        split_over_processes((2, 1, 1, 1, 1, 3), 4)
    with pytest.raises(ValueError, match="different numbers"):
        device_grid((1, 1, 1, 1, 1, 6), hosts(2, 4)[:6])


# --- start-up and data ------------------------------------------------------------


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, False),  # one task: a one-process run
        ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, True),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
        ({"LITE_TP_COORDINATOR": "127.0.0.1:1", "LITE_TP_NUM_PROCESSES": "2", "LITE_TP_PROCESS_ID": "0"}, True),
    ],
)
def test_cluster_is_read_from_the_environment(monkeypatch, env, expected):
    from lite_tp_jax.runtime.devices import cluster_in_environment

    for name in ("SLURM_NTASKS", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS",
                 "LITE_TP_COORDINATOR", "LITE_TP_NUM_PROCESSES", "LITE_TP_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cluster_in_environment() is expected


def test_deterministic_mode_sets_the_gpu_flag_once(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    use_deterministic_gpu_ops()
    use_deterministic_gpu_ops()
    import os

    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_gpu_deterministic_ops=true"


def test_device_batch_holds_the_batch():
    from lite_tp_jax.core.mesh import make_mesh
    from lite_tp_jax.train.data import Batches, device_batch, process_rows
    from lite_tp_jax.sharding.rules import batch_sharding

    sharding = batch_sharding(make_mesh(data=2, tensor=4))
    batches = Batches(np.arange(5000) % 256, 8, 16, seed=0)
    assert process_rows(sharding, (8, 16)) == slice(0, 8)  # one process holds every row
    for array, expected in zip(device_batch(batches, 3, sharding), batches.batch(3)):
        assert array.sharding == sharding
        np.testing.assert_array_equal(array, expected)
    np.testing.assert_array_equal(batches.batch(3, slice(2, 5))[1], batches.batch(3)[1][2:5])


# --- the launcher ------------------------------------------------------------------

def environments(processes: int, devices: int) -> list[dict]:
    port = free_port()  # one coordinator for all
    return [worker_environment(rank, processes, devices, port) for rank in range(processes)]


SCRIPT = """
import os, sys, time
rank = int(os.environ["LITE_TP_PROCESS_ID"])
print(f"hello from {rank}", flush=True)
if rank == 1:
    time.sleep(0.5)
    def inner(): raise RuntimeError(f"boom on rank {rank}")
    inner()
time.sleep(120)  # rank 0 would wait for its peer for ever
"""


def test_a_failing_process_stops_the_others(tmp_path, capsys):
    envs = environments(2, 1)
    code = run_processes([sys.executable, "-c", SCRIPT], envs, tmp_path / "logs")
    out, err = capsys.readouterr()
    assert code == 1
    assert out == "hello from 0\n"  # only rank 0's output is shown
    assert err.startswith("lite-tp launch: process 1 exited with code 1: RuntimeError: boom on rank 1")
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "Traceback" in (tmp_path / "logs" / "rank-1.log").read_text()
    assert "hello from 1" in (tmp_path / "logs" / "rank-1.log").read_text()


ABORT = r"""
import os, sys
sys.stderr.write("F1125 client.h:80] Terminating process because the JAX distributed service detected fatal errors.\n"
                 "\nRPC: /xla.coordination.CoordinationService/RegisterTask\n*** Check failure stack trace: ***\n"
                 "    @     0x7fee99b58ba3  PyObject_Vectorcall\n")
sys.stderr.flush()
os.abort()
"""


def test_an_aborted_process_reports_its_fatal_line_not_its_stack(tmp_path, capsys):
    assert run_processes([sys.executable, "-c", ABORT], environments(1, 1), tmp_path / "logs") == 1
    err = capsys.readouterr().err
    assert "process 0 was killed by signal 6: F1125 client.h:80] Terminating process because" in err, err


GLOO = r"""
import sys
sys.stdout.write("def ")  # Gloo writes its chatter into the middle of a line
sys.stdout.write("[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n")
sys.stdout.write("[Gloo] Rank [Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n")
sys.stdout.write("0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n")
sys.stdout.write("7 peer ranks. Expected number of connected peer ranks is : 7\n")  # another cut
sys.stdout.write("foo\n")
"""


def test_gloo_chatter_is_cut_out_of_the_output(tmp_path, capsys):
    assert run_processes([sys.executable, "-c", GLOO], environments(1, 1), tmp_path / "logs") == 0
    assert capsys.readouterr().out == "def foo\n"
    assert (tmp_path / "logs" / "rank-0.log").read_text() == "def foo\n"


def test_bad_input_in_the_workers_exits_2(tmp_path, capsys):
    envs = environments(2, 1)
    argv = [sys.executable, "-m", "lite_tp_jax.cli", "train", str(tmp_path / "missing.yaml")]
    assert run_processes(argv, envs, tmp_path / "logs") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "missing.yaml" in err, err


def test_a_process_that_cannot_start(tmp_path, capsys):
    envs = environments(2, 1)
    assert run_processes([str(tmp_path / "no-such-program")], envs, tmp_path / "logs") == 1
    assert "process 0 failed to start" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["launch", "--processes", "3", "--", "train", str(TINY), "--set", "mesh.tensor=4"],
         "4 devices do not split evenly over --processes 3"),
        (["launch", "--processes", "2", "--", "train", str(TINY), "--set", "train.stepz=4"], "train.stepz"),
        (["launch", "--processes", "2", "--", "plan"], "launch runs 'train' or 'generate'"),
        (["launch", "--processes", "2", "--", "train", str(TINY), "--set", "mesh.spares=1"], "set mesh.spares=0"),
    ],
)
def test_bad_launch_arguments_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err


def test_a_launch_refused_for_a_run_in_use_is_quick_and_touches_nothing(tmp_path, capsys):
    from lite_tp_jax.runtime.run_dir import RunLock

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "rank-0.log").write_text("the running job's log\n")
    (run / "metrics.jsonl").write_text("")
    started = time.monotonic()
    with RunLock(run):
        assert cli.main(["launch", "--processes", "2", "--", "train", str(TINY), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is in use by process" in err and len(err.splitlines()) == 1, err
    assert (run / "logs" / "rank-0.log").read_text() == "the running job's log\n"
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["rank-0.log"]
    assert time.monotonic() - started < 30  # no worker was started (it took 49 s to be refused)


ORPHAN = r"""
import sys
from lite_tp_jax.runtime.launch import run_processes, worker_environment
pid_file, logs = sys.argv[1], sys.argv[2]
worker = f"import os, time; open({pid_file!r}, 'w').write(str(os.getpid())); time.sleep(120)"
run_processes([sys.executable, "-c", worker], [worker_environment(0, 1, 1, 1)], logs)
"""


def test_workers_die_with_their_launcher(tmp_path):
    """kill -9 of the launcher: its workers do not train on as orphans."""
    pid_file = tmp_path / "worker.pid"
    launcher = subprocess.Popen([sys.executable, "-c", ORPHAN, str(pid_file), str(tmp_path / "logs")])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited


# --- training across processes ------------------------------------------------------

DATA2_TENSOR4 = ["mesh.data=2", "mesh.tensor=4", "checkpoint.every=2", "checkpoint.keep=3"]
STEPS = 6


def losses(run_dir) -> list[float]:
    records = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if "event" not in r]  # not the goodput event


def train_here(run_dir, overrides):
    """The same run in this process (8 fake devices), for reference."""
    from lite_tp_jax.run.config_file import load_config
    from lite_tp_jax.train.loop import Trainer

    return [r["loss"] for r in Trainer(load_config(TINY, overrides), run_dir).run(show_progress=False)]


def launch_cli(*argv, timeout=900):
    result = subprocess.run(
        [sys.executable, "-m", "lite_tp_jax.cli", "launch", *argv], capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> list[str]:
    """Overrides that train on packed documents from a mixture of two tokenized
    corpora (two standard-library packages, weighted 3:1), so the runs below
    also show that packing and mixtures resume exactly across process counts."""
    import sysconfig

    from lite_tp_jax.run.tokenizer import load_tokenizer
    from lite_tp_jax.train.tokenize import tokenize

    root, stdlib = tmp_path_factory.mktemp("corpora"), Path(sysconfig.get_paths()["stdlib"])
    for name in ("json", "email"):
        tokenize(str(stdlib / name / "*.py"), root / name, load_tokenizer("bytes"), show_progress=False)
    return ["data.source=tokenized", "data.packing=true",
            f"data.sources=[{{path: {root / 'json'}, weight: 3}}, {{path: {root / 'email'}, weight: 1}}]"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, mixture):
    """data 2 x tensor 4 for 6 steps in this process on packed documents of a
    mixture; checkpoints at 2, 4, 6."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    return run_dir, train_here(run_dir, [*DATA2_TENSOR4, *mixture, f"train.steps={STEPS}"])


def test_two_processes_train_as_one_are_preempted_together_and_restore_in_one(one_process_run, mixture, tmp_path):
    """`lite-tp launch --processes 2 -- train tiny data 2 x tensor 4`: the same
    losses as one process. SIGTERM to the launcher once the first step is
    recorded: both processes save the same step at a step boundary and stop,
    and the launch exits 143; that checkpoint (written by 2 processes) resumes
    here and the run continues exactly: 2 processes -> 1."""
    reference_dir, reference = one_process_run
    run_dir = tmp_path / "two"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "lite_tp_jax.cli", "launch", "--processes", "2", "--", "train", str(TINY),
         "--run-dir", str(run_dir), "--no-progress", "--set", *DATA2_TENSOR4, *mixture, f"train.steps={STEPS}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    while launcher.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.01)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=900)
    assert launcher.returncode == 143, stderr[-3000:]
    assert "preempted (SIGTERM)" in stderr and "Gloo" not in stderr
    preempted_at = len(losses(run_dir))
    assert preempted_at >= 1, "no step was recorded before the preemption checkpoint"
    assert preempted_at < STEPS, f"the launch ran all {STEPS} steps: SIGTERM did not stop it early"
    np.testing.assert_allclose(losses(run_dir), reference[:preempted_at], rtol=1e-5)
    assert str(preempted_at) in {p.name for p in (run_dir / "checkpoints").iterdir()}
    for rank in (0, 1):
        assert f"checkpoint {preempted_at} saved" in (run_dir / "logs" / f"rank-{rank}.log").read_text()
    assert (run_dir / "config.yaml").exists()

    resumed = train_here(run_dir, [*DATA2_TENSOR4, *mixture, f"train.steps={STEPS}"])  # 2 processes -> 1
    np.testing.assert_allclose(resumed, reference[preempted_at:], rtol=1e-5)


def test_four_processes_resume_a_one_process_checkpoint(one_process_run, mixture, tmp_path):
    """4 processes x 2 devices (tensor spans two hosts) resume step 4 of the
    one-process run and continue it: 1 process -> 4. Keeping one checkpoint,
    all four rotate step 4 away together (orbax's delete is collective)."""
    reference_dir, reference = one_process_run
    run_dir = tmp_path / "four"
    shutil.copytree(reference_dir / "checkpoints" / "4", run_dir / "checkpoints" / "4")
    launch_cli("--processes", "4", "--", "train", str(TINY), "--run-dir", str(run_dir), "--no-progress",
               "--set", *DATA2_TENSOR4, *mixture, f"train.steps={STEPS}", "checkpoint.keep=1")
    np.testing.assert_allclose(losses(run_dir), reference[4:], rtol=1e-5)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [str(STEPS)]


DETERMINISTIC_MESH = ["mesh.tensor=8", "train.steps=3"]
PIPELINE_MESH = ["mesh.pipeline=2", "mesh.tensor=4", "train.microbatches=2", "train.steps=2"]


def final_parameters(run_dir, overrides) -> dict[str, np.ndarray]:

    from flax import nnx

    from lite_tp_jax import export_state
    from lite_tp_jax.core.mesh import make_mesh_for
    from lite_tp_jax.run.checkpoint import Checkpointer
    from lite_tp_jax.run.config_file import load_config
    from lite_tp_jax.run.optimizer import create_model_and_optimizer

    config = load_config(TINY, overrides)
    mesh = make_mesh_for(config.mesh.requested, spares=config.mesh.spares)
    model, optimizer = create_model_and_optimizer(config.model, config.train, mesh)
    Checkpointer(Path(run_dir) / "checkpoints", keep=2).restore({"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, mesh)
    return export_state(model)


def test_deterministic_mode_gives_the_same_bits_on_two_processes(tmp_path):
    """tensor 8 over 1 process x 8 devices and over 2 processes x 4: with
    train.deterministic the per-step losses and final parameters are bitwise
    equal. Default mode is not: its all-reduce of the same rows gives other
    bits across processes (the deterministic one the same). The tensor axis
    spans both processes, and the 2 kv heads are replicated over it. The same
    launch also trains pipeline 2 x tensor 4 across 2 processes."""
    from launch_worker import all_reduce_sums

    deterministic = [*DETERMINISTIC_MESH, "train.deterministic=true"]
    plan = [{"run_dir": str(tmp_path / "two" / "deterministic"), "overrides": deterministic},
            {"run_dir": str(tmp_path / "two" / "pipeline"), "overrides": PIPELINE_MESH},
            {"all_reduce_to": str(tmp_path / "two" / "sums.npz")}]
    (tmp_path / "two").mkdir()
    worker = [sys.executable, str(ROOT / "tests" / "launch_worker.py"), json.dumps(plan)]
    assert run_processes(worker, environments(2, 4), tmp_path / "logs") == 0

    assert losses(tmp_path / "two" / "deterministic") == train_here(tmp_path / "one", deterministic)
    one, two = (final_parameters(path, deterministic) for path in (tmp_path / "one", tmp_path / "two" / "deterministic"))
    for name in one:
        np.testing.assert_array_equal(two[name], one[name], err_msg=name)

    here, there = all_reduce_sums(), np.load(tmp_path / "two" / "sums.npz")
    np.testing.assert_array_equal(there["deterministic"], here["deterministic"])
    np.testing.assert_allclose(there["default"], here["default"], rtol=1e-5, atol=1e-5)
    assert not np.array_equal(there["default"], here["default"])

    np.testing.assert_allclose(losses(tmp_path / "two" / "pipeline"), train_here(tmp_path / "pipeline", PIPELINE_MESH),
                               rtol=1e-5)
