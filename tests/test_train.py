"""End to end: the loss does not depend on the mesh; checkpoints restore onto
other meshes; kill -9 and resume reproduces the uninterrupted run; the CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from lite_tp_jax import export_state
from lite_tp_jax.core.mesh import make_mesh_for
from lite_tp_jax.cli import main
from lite_tp_jax.run.checkpoint import Checkpointer
from lite_tp_jax.run.config_file import load_config
from lite_tp_jax.train.data import Batches, load_tokens
from lite_tp_jax.inference.loading import load_trained_model
from lite_tp_jax.inference.text import generate
from lite_tp_jax.runtime.metrics import MetricsLog
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.sharding.rules import batch_sharding
from lite_tp_jax.train.decoder_step import decoder_step

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
STEPS = 3


def mesh_for(config):
    return make_mesh_for(config.mesh.requested, spares=config.mesh.spares)


@pytest.fixture(scope="module")
def tokens():
    return load_tokens(load_config(TINY).data, 256)


def tiny_losses(tokens, overrides):
    config = load_config(TINY, [f"train.steps={STEPS}", *overrides])
    mesh = mesh_for(config)
    model, optimizer = create_model_and_optimizer(config.model, config.train, mesh)
    step = decoder_step(model, optimizer, config.train)
    batches = Batches(tokens, config.train.global_batch, config.train.seq_len, config.train.seed)
    losses = []
    for position in range(STEPS):
        inputs, targets = (jax.device_put(a, batch_sharding(mesh)) for a in batches.batch(position))
        losses.append(float(step((inputs, targets))["loss"]))
    return np.array(losses)


@pytest.fixture(scope="module")
def reference_losses(tokens):
    return tiny_losses(tokens, ["mesh.tensor=1"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["mesh.tensor=8"],
        ["mesh.data=2", "mesh.tensor=4"],
        ["mesh.tensor=4", "model.sequence_parallel=true"],
        ["mesh.tensor=3"],  # uneven: 4 heads, 2 kv heads, ffn 172 over 3 ranks
    ],
    ids=["tensor8", "data2-tensor4", "tensor4-sp", "tensor3"],
)
def test_loss_does_not_depend_on_the_mesh(tokens, reference_losses, overrides):
    losses = tiny_losses(tokens, overrides)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-4)
    assert losses[-1] < losses[0]


def test_checkpoint_restores_onto_other_meshes(tmp_path):
    config = load_config(TINY, ["mesh.tensor=4"])
    model, optimizer = create_model_and_optimizer(config.model, config.train, mesh_for(config))
    # Give the optimizer moments non-trivial values, so they are checked too.
    nnx.update(optimizer, jax.tree.map(lambda x: x + np.asarray(3, x.dtype), nnx.state(optimizer)))
    checkpointer = Checkpointer(tmp_path, keep=1)
    checkpointer.save(7, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, {"step": 7, "data_position": 7})
    saved = export_state(nnx.state((model, optimizer)))

    for overrides in (
        ["mesh.tensor=2"], ["mesh.tensor=8"], ["mesh.data=2", "mesh.tensor=4"], ["mesh.tensor=3"],
        ["mesh.pipeline=2", "mesh.tensor=4"],
    ):
        target = load_config(TINY, overrides)
        mesh = mesh_for(target)
        other_model, other_optimizer = create_model_and_optimizer(target.model, target.train, mesh)
        progress = checkpointer.restore({"model": nnx.state(other_model), "optimizer": nnx.state(other_optimizer)}, mesh)
        assert progress == {"step": 7, "data_position": 7}
        state = nnx.state((other_model, other_optimizer))
        restored = export_state(state)
        assert restored.keys() == saved.keys()
        for name in saved:
            np.testing.assert_array_equal(restored[name], saved[name], err_msg=f"{overrides} {name}")
        kernel = state[0]["head"]["embedding"][...]  # (model, optimizer)[0]
        assert kernel.sharding.mesh.shape["tensor"] == mesh.shape["tensor"]


def test_metrics_log_drops_steps_to_redo_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')  # killed while writing step 4
    MetricsLog(path, resume_step=2).append({"step": 3, "loss": 1.0})
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}, {"step": 3, "loss": 1.0}]


def read_metrics(run_dir: Path) -> list[dict]:
    """The step records (not the events, e.g. the ``goodput`` one at the end of a run)."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


def train_command(run_dir, steps):
    return [
        sys.executable, "-m", "lite_tp_jax.cli", "train", str(TINY), "--no-progress",
        "--set", f"train.steps={steps}", "--set", "checkpoint.every=3",
        "--set", "mesh.data=2", "--set", "mesh.tensor=2", "--run-dir", str(run_dir),
    ]


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    steps = 40  # long enough that the kill lands mid-run on a fast machine too
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    uninterrupted = tmp_path / "uninterrupted"
    subprocess.run(train_command(uninterrupted, steps), check=True, env=env, capture_output=True)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(train_command(resumed, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill -9 once a checkpoint exists and training went on past it
        metrics = resumed / "metrics.jsonl"
        done = metrics.exists() and metrics.read_text().count("\n") >= 5  # complete lines only
        if done or process.poll() is not None:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = (resumed / "metrics.jsonl").read_text().count("\n")
    assert 5 <= killed_at < steps, "the run should have been killed mid-way"

    subprocess.run(train_command(resumed, steps), check=True, env=env, capture_output=True)
    expected, got = read_metrics(uninterrupted), read_metrics(resumed)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]

    model = load_trained_model(resumed)
    text = generate(model, "def ", max_new_tokens=20)
    assert text.startswith("def ") and len(text.encode()) >= 20


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", str(TINY), "--set", "model.hiden_size=8"], "unknown key 'model.hiden_size'"),
        (["train", str(TINY), "--set", "train.global_batch=3", "--set", "mesh.data=2"], "'train.global_batch' (3) must be divisible by 'mesh.data' (2) x 'mesh.expert' (1)"),
        (["train", "no/such.yaml"], "no/such.yaml"),
        (
            ["train", str(TINY), "--set", "model.num_layers=4", "mesh.pipeline=2", "model.virtual_stages=2"],
            "'train.microbatches' (1) must be at least 'mesh.pipeline' (2) for the circular schedule",
        ),
        (["generate", "--run-dir", "no/such/run", "--prompt", "x"], "No config.yaml in no/such/run"),
        (["train"], "lite-tp train needs a CONFIG file"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, message, capsys, tmp_path):
    code = main([*argv, *(["--run-dir", str(tmp_path / "run")] if argv[0] == "train" and len(argv) > 1 else [])])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing written for bad input
