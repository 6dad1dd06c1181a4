"""The logs people read (issue 19, parts 5-9): TensorBoard from metrics.jsonl's
records, MFU, a profiler trace, the goodput breakdown and the persistent
compilation cache, checked on two identical ``lite-tp train`` runs in fresh
processes sharing the suite's cache directory (``$JAX_COMPILATION_CACHE_DIR``,
conftest.py), so the second loads its step instead of compiling it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from lite_tp_jax.cli import main
from lite_tp_jax.core.errors import BadInput
from lite_tp_jax.core.mesh import make_mesh_for
from lite_tp_jax.models.flops import attention_flops_per_token, matmul_params, training_flops_per_step
from lite_tp_jax.run.config import LoggingConfig
from lite_tp_jax.run.config_file import load_config
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.runtime.metrics import MetricsLog
from lite_tp_jax.train import sinks
from lite_tp_jax.train.goodput import CATEGORIES

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
STEPS, PEAK_TFLOPS = 3, 0.05
OVERRIDES = [f"train.steps={STEPS}", f"checkpoint.every={STEPS}", "train.warmup_steps=1"]


def train(run_dir: Path, *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "lite_tp_jax.cli", "train", str(TINY), "--no-progress", "--run-dir", str(run_dir),
         "--set", *OVERRIDES, "--peak-tflops", str(PEAK_TFLOPS), *extra],
        env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two identical runs; the first traces steps 2..3."""
    root = tmp_path_factory.mktemp("logs")
    first = train(root / "first", "--profile", "2:3")
    second = train(root / "second")
    return root, first, second


def records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" not in r], [r for r in lines if "event" in r]


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the run's TensorBoard event files, read back with tensorboard's own loader."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    found: dict[str, dict[int, float]] = {}
    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file"
    for path in files:
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                number = value.simple_value if value.HasField("simple_value") else tensor_util.make_ndarray(value.tensor)
                found.setdefault(value.tag, {})[event.step] = float(number)
    return found


def test_tensorboard_holds_the_records_of_metrics_jsonl(runs):
    root, _, _ = runs
    steps, events = records(root / "first")
    board = scalars(root / "first")
    for name in ("loss", "lr", "grad_norm", "param_norm", "tokens_per_s", "mfu", "step_time_s"):
        assert board[f"train/{name}"] == pytest.approx({r["step"]: r[name] for r in steps}, rel=1e-6), name
    (goodput,) = events
    for name in ("wall_s", "productive_step_s", "compile_s", "checkpoint_s", "goodput"):
        assert board[f"goodput/{name}"] == pytest.approx({STEPS: goodput[name]}, rel=1e-6), name


def test_mfu_is_model_flops_over_time_devices_and_peak(runs):
    root, first, _ = runs
    steps, (goodput,) = records(root / "first")
    config = load_config(TINY, OVERRIDES)
    flops = training_flops_per_step(config.model, config.train.global_batch, config.train.seq_len)
    assert goodput["flops_per_step"] == flops
    for record in steps:  # one device (tiny.yaml's mesh)
        assert record["mfu"] == pytest.approx(flops / (record["step_time_s"] * PEAK_TFLOPS * 1e12), rel=1e-9)
    assert f"model FLOPs per step {flops:.3g}" in first and "memory per device" in first


def test_the_flop_count_counts_every_matmul_parameter_once():
    """N of ``models/flops.py`` against the parameters of the built model: every
    kernel and the head, not the input embedding, norms or biases."""
    for overrides in ([], ["model.activation=gelu", "model.norm=layer", "model.position=learned", "model.mlp_bias=true"]):
        config = load_config(TINY, overrides)
        model, _ = nnx.eval_shape(lambda: create_model_and_optimizer(config.model, config.train, make_mesh_for({})))
        sizes = {".".join(map(str, path)): int(np.prod(variable.get_raw_value().shape))
                 for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        assert "embed.embedding" in sizes and any(name.endswith("bias") for name in sizes) == bool(overrides)
        counted = sum(n for name, n in sizes.items() if name.endswith(("kernel", "head.embedding")))
        assert matmul_params(config.model) == counted, overrides
    m = config.model  # causal attention counts half: per token, layers x 2 matmuls x 2 x heads x head_dim x seq / 2
    assert attention_flops_per_token(m, 64) == m.num_layers * 2 * 2 * m.num_heads * m.resolved_head_dim * 32


def test_profile_writes_an_xplane_trace_and_names_it(runs):
    root, first, second = runs
    traces = list((root / "first" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert f"profile of steps 2..3: {traces[0].parent}" in first
    assert not (root / "second" / "profile").exists() and "profile of steps" not in second


def test_goodput_breaks_the_wall_time_down(runs):
    root, first, _ = runs
    steps, events = records(root / "first")
    assert [r["step"] for r in steps] == [1, 2, 3] and [e["event"] for e in events] == ["goodput"]
    goodput = events[0]
    assert goodput["step"] == STEPS and goodput["restarts"] == goodput["takeovers"] == 0
    assert goodput["productive_step_s"] == pytest.approx(sum(r["step_time_s"] for r in steps), abs=2e-3)
    parts = sum(goodput[name] for name in (*CATEGORIES, "other_s"))
    assert parts == pytest.approx(goodput["wall_s"], abs=1e-2)
    assert goodput["compile_s"] > 0 and goodput["checkpoint_s"] > 0 and 0 < goodput["goodput"] < 1
    assert f"goodput {goodput['goodput']:.0%}: {goodput['productive_step_s']:.1f} s of {goodput['wall_s']:.1f} s" in first


def test_a_second_identical_run_loads_its_step_from_the_compilation_cache(runs):
    root, first, second = runs
    (cold,), (warm,) = records(root / "first")[1], records(root / "second")[1]
    assert cold["cache_hits"] + cold["cache_misses"] >= 1  # the cache was asked (an earlier test may have filled it)
    assert warm["cache_hits"] >= 1 and warm["cache_misses"] == 0  # the same program: loaded, not compiled
    assert "training step loaded from the compilation cache" in second
    for event in (cold, warm):
        assert 0 < event["trace_lower_s"] + event["xla_compile_s"] <= event["compile_s"]
    assert records(root / "second")[0][-1]["loss"] == records(root / "first")[0][-1]["loss"]


def test_goodput_counts_restarts_and_takeovers_from_their_events(tmp_path):
    from lite_tp_jax.train.goodput import Goodput, summary

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 1.0}, {"event": "restart", "step": 1, "seconds_to_first_step": 4.5},
        {"event": "spare_takeover", "step": 2, "seconds": 0.7}, {"event": "restart", "step": 2, "seconds_to_first_step": None},
        {"event": "restart", "step": 3, "seconds_to_first_step": 2.0},
    ]))
    goodput = Goodput()
    goodput.add("productive_step_s", 0.25)
    event = goodput.event(3, path)
    assert (event["restarts"], event["restart_s"], event["takeovers"]) == (3, 6.5, 1)
    assert "3 restart(s) before this process, 6.5 s from failure to the next first step; 1 spare takeover(s)" in summary(event)


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: its first ``init`` fails as an unreachable service does."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], False

    def init(self, **options):
        self.inits.append(options)
        if options.get("mode") != "offline":
            raise ConnectionError("cannot reach api.wandb.ai")
        return self

    def log(self, values, step=None):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_goes_offline_instead_of_failing_and_gets_the_records(tmp_path, monkeypatch, capsys):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = sinks.RunLog.open(MetricsLog(tmp_path / "metrics.jsonl", 0), LoggingConfig(tensorboard=False, wandb_project="p"),
                            tmp_path, 0, {"train": {"steps": 2}})
    log.append({"step": 1, "loss": 2.5, "lr": 0.1, "skipped": 0.0})
    log.append({"event": "goodput", "step": 1, "wall_s": 3.0})
    log.close()
    assert [o.get("mode") for o in fake.inits] == [None, "offline"] and fake.inits[1]["project"] == "p"
    assert "W&B is unreachable (ConnectionError" in capsys.readouterr().err
    assert fake.logged == [(1, {"train/loss": 2.5, "train/lr": 0.1, "train/skipped": 0.0}), (None, {"goodput/wall_s": 3.0})]
    assert fake.finished
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 1]


def test_wandb_asked_for_but_not_installed_is_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(BadInput, match="the wandb package is not installed; pip install wandb"):
        sinks.check_wandb(LoggingConfig(wandb_project="p"))
    run = tmp_path / "run"
    assert main(["train", str(TINY), "--no-progress", "--run-dir", str(run), "--set", "logging.wandb_project=p"]) == 2
    assert "logging.wandb_project' is 'p' but the wandb package is not installed" in capsys.readouterr().err
    assert not run.exists()


def test_the_cache_directory_is_the_config_s_then_the_environment_s_then_the_user_s(tmp_path, monkeypatch):
    from lite_tp_jax.runtime.compile_cache import default_cache_dir

    # conftest.py's cache: the suite never writes to the user's cache directory.
    assert default_cache_dir() == Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    assert Path.home() / ".cache" not in default_cache_dir().parents
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "lite_tp_jax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "lite_tp_jax" / "jax"
    assert load_config(TINY, ["compile.cache_dir=/some/dir"]).compile.cache_dir == "/some/dir"  # wins when set
