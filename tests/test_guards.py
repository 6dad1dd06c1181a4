"""Never lose a run: bad input and faults, one table of CLI cases, plus the
unit behaviours under them (skipped updates, rotation, import_state, layers).

Each table row: the command's inputs (overrides, a prepared run directory, a
fault applied to it), the exit code, a fragment of the one stderr line, and
the files that must be byte-for-byte unchanged afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import tp_mesh
from lite_tp_jax import (
    ColumnParallelLinear, MoEMLP, ParallelAttention, ParallelMLP, RMSNorm, RowParallelLinear,
    VocabParallelEmbedding, export_state, import_state,
)
from lite_tp_jax.cli import main
from lite_tp_jax.core.mesh import make_mesh, make_mesh_for
from lite_tp_jax.run.checkpoint import MANIFEST, Checkpointer, NonFiniteError
from lite_tp_jax.run.config_file import load_config
from lite_tp_jax.train.data import Batches, load_tokens
from lite_tp_jax.runtime.run_dir import RunLock
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.sharding.rules import batch_sharding
from lite_tp_jax.train.decoder_step import decoder_step

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# Two steps between checkpoints; the prepared run holds checkpoints 2 and 4.
BASE = ["train.steps=4", "checkpoint.every=2", "train.warmup_steps=1"]


def snapshot(root: Path, paths: list[str]) -> dict[str, str | None]:
    """sha256 of every file under each path (None: absent)."""
    digests = {}
    for rel in paths:
        path = root / rel
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []
        if not path.exists():
            digests[rel] = None
        for f in files:
            digests[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints 2 and 4), copied by each case that needs one.
    In a subprocess like the reruns it is compared with: XLA's CPU kernels may sum
    in another order in a process holding 8 fake devices than in one holding 1."""
    run = tmp_path_factory.mktemp("trained") / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "lite_tp_jax.cli", "train", str(TINY), "--no-progress", "--run-dir", str(run),
                    "--set", *BASE], env=env, check=True, capture_output=True)
    return run


# ---- faults applied to a copy of the trained run ----------------------------


def _largest_data_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "model").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate_latest(run: Path) -> None:
    f = _largest_data_file(run / "checkpoints" / "4")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_a_byte_in_latest(run: Path) -> None:
    f = _largest_data_file(run / "checkpoints" / "4")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def delete_half_of_latest(run: Path) -> None:
    shutil.rmtree(run / "checkpoints" / "4" / "model")


def unreadable_manifest_in_latest(run: Path) -> None:
    (run / "checkpoints" / "4" / MANIFEST).write_text("{not json")


def nan_in_latest(run: Path) -> None:
    """A checkpoint 4 whose parameters are NaN, sealed as intact (as an older
    version without the finiteness guard could have written)."""
    config = load_config(TINY, BASE)
    mesh = make_mesh_for(config.mesh.requested, spares=config.mesh.spares)
    model, optimizer = create_model_and_optimizer(config.model, config.train, mesh)
    model.final_norm.scale[...] = model.final_norm.scale[...] * np.nan
    shutil.rmtree(run / "checkpoints" / "4")
    checkpointer = Checkpointer(run / "checkpoints", keep=5)
    from lite_tp_jax.run import checkpoint as module

    guard, module.first_non_finite = module.first_non_finite, lambda arrays: None
    try:
        checkpointer.save(4, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, {"step": 4, "data_position": 4})
        checkpointer.close()
    finally:
        module.first_non_finite = guard


def damage_both(run: Path) -> None:
    truncate_latest(run)
    shutil.rmtree(run / "checkpoints" / "2" / "model")


def damage_metrics_line(run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = '{"step": 2, "loss": 1.2'  # a broken line in the middle
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def stale_lock(run: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(f"{dead.pid}\n")


def make_run_dir_a_file(run: Path) -> None:
    run.parent.mkdir(parents=True, exist_ok=True)
    run.write_text("not a directory")


def make_checkpoints_a_file(run: Path) -> None:
    run.mkdir(parents=True)
    (run / "checkpoints").write_text("not a directory")


def write_bad_yaml(run: Path) -> None:
    run.parent.mkdir(parents=True, exist_ok=True)
    (run.parent / "bad.yaml").write_text("model: [unclosed\n")


def foreign_folder(run: Path) -> None:
    """A folder of the user's own (``--run-dir .`` in a project): files, no run."""
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("my notes\n")
    (run / "config.yaml").write_text("not: ours\n")


def write_empty_yaml(run: Path) -> None:
    run.parent.mkdir(parents=True, exist_ok=True)
    (run.parent / "empty.yaml").write_text("# nothing but a comment\n")


def make_fifo(run: Path) -> None:
    run.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(run.parent / "fifo.npy")


# ---- the table --------------------------------------------------------------

TRAINED = "trained"  # the case starts from a copy of the trained run
ALL = ["checkpoints", "metrics.jsonl", "config.yaml"]
CASES = [
    # (id, run dir: None | TRAINED, fault, overrides (or argv), exit code, stderr fragment, unchanged on disk)
    ("unknown-key", None, None, ["model.hiden_size=8"], 2, "unknown key 'model.hiden_size'", ["."]),
    ("nonfinite-policy-typo", None, None, ["train.on_nonfinite=ignore"], 2, "'train.on_nonfinite' must be one of stop, skip", ["."]),
    ("huge-fake-mesh", None, None, ["mesh.tensor=100000"], 2, "set LITE_TP_MAX_FAKE_DEVICES=100000 to override", ["."]),
    ("huge-fake-mesh-product", None, None, ["mesh.data=1000", "mesh.tensor=1000"], 2, "the mesh needs 1000000 devices", ["."]),
    ("zero-mesh-axis", None, None, ["mesh.tensor=0"], 2, "'mesh.tensor' must be an integer >= 1", ["."]),
    ("fractional-mesh-axis", None, None, ["mesh.tensor=1.5"], 2, "'mesh.tensor' must be an integer", ["."]),
    ("nan-learning-rate", None, None, ["train.lr=.nan"], 2, "'train.lr' must be a number >= 0", ["."]),
    ("zero-keep", None, None, ["checkpoint.keep=0"], 2, "'checkpoint.keep' must be an integer >= 1", ["."]),
    ("negative-every", None, None, ["checkpoint.every=-1"], 2, "'checkpoint.every' must be an integer >= 1", ["."]),
    ("batch-not-divisible", None, None, ["train.global_batch=3", "mesh.data=2"], 2, "must be divisible by 'mesh.data'", ["."]),
    ("batch-not-divisible-by-fsdp", None, None, ["train.global_batch=6", "mesh.fsdp=4"], 2,
     "'train.global_batch' (6) must be divisible by 'mesh.data' (1) x 'mesh.expert' (1) x 'mesh.fsdp' (4)", ["."]),
    ("zero-fsdp-axis", None, None, ["mesh.fsdp=0"], 2, "'mesh.fsdp' must be an integer >= 1", ["."]),
    ("shard-optimizer-without-data", None, None, ["train.shard_optimizer=true", "mesh.fsdp=2"], 2,
     "'train.shard_optimizer' (True) splits the AdamW moments over 'mesh.data' (1), so it needs 'mesh.data' > 1", ["."]),
    ("text-without-path", None, None, ["data.source=text"], 2, "'data.path' is required", ["."]),
    ("missing-data-file", None, None, ["data.source=tokens", "data.path=/no/such/tokens.npy"], 2, "/no/such/tokens.npy", ["."]),
    ("missing-config", None, None, {"config": "no/such.yaml"}, 2, "no/such.yaml", ["."]),
    ("config-not-yaml", None, write_bad_yaml, {"config": "bad.yaml"}, 2, "is not valid YAML", ["."]),
    ("run-dir-is-a-file", None, make_run_dir_a_file, [], 2, "is not a writable directory", ["."]),
    ("run-dir-under-a-file", None, make_run_dir_a_file, {"run_dir": "run/sub"}, 2, "is not a writable directory", ["."]),
    ("checkpoints-is-a-file", None, make_checkpoints_a_file, [], 2, "checkpoint directory", ["."]),
    ("run-dir-read-only-fs", None, None, {"run_dir": "/proc/lite_tp_run"}, 2, "is not a writable directory", ["."]),
    ("run-dir-in-use", TRAINED, "hold_lock", [], 2, "is in use by process {pid}", ALL),
    ("resume-other-hidden-size", TRAINED, None, ["model.hidden_size=32"], 2,
     "'model.embed.embedding' is [256, 64] in the checkpoint but [256, 32] in this model", ALL),
    ("resume-more-layers", TRAINED, None, ["model.num_layers=3"], 2, "in the checkpoint but [3, 64, 2, 16] in this model", ALL),
    ("resume-untied-vs-tied", TRAINED, None, ["model.tie_embeddings=true"], 2,
     "'model.head.embedding' [256, 64] is in the checkpoint but not in this model", ALL),
    ("all-checkpoints-damaged", TRAINED, damage_both, [], 2, "No intact checkpoint", ALL),
    ("truncated-latest", TRAINED, truncate_latest, [], 0, "checkpoints/4 is damaged", ["checkpoints/2"]),
    ("corrupted-latest", TRAINED, flip_a_byte_in_latest, [], 0, "does not match its checksum", ["checkpoints/2"]),
    ("half-deleted-latest", TRAINED, delete_half_of_latest, [], 0, "is missing", ["checkpoints/2"]),
    ("manifest-unreadable", TRAINED, unreadable_manifest_in_latest, [], 0, "lite_tp_manifest.json is unreadable", ["checkpoints/2"]),
    ("nan-checkpoint", TRAINED, nan_in_latest, [], 0, "'model.final_norm.scale' holds a NaN or infinity", ["checkpoints/2"]),
    ("damaged-metrics-line", TRAINED, damage_metrics_line, [], 0, "metrics.jsonl:2 is damaged", ["checkpoints", "config.yaml"]),
    ("stale-lock", TRAINED, stale_lock, [], 0, "left by process", ALL),
    ("already-done", TRAINED, None, [], 0, "", ALL),
    ("profile-end-before-start", None, None, {"argv": ["--profile", "3:2"]}, 2,
     "--profile takes START:END, two steps with 1 <= START <= END (e.g. 5:8), got '3:2'", ["."]),
    ("profile-not-a-range", None, None, {"argv": ["--profile", "abc"]}, 2, "--profile takes START:END", ["."]),
    ("profile-from-step-0", None, None, {"argv": ["--profile", "0:2"]}, 2, "got '0:2'", ["."]),
    ("profile-past-the-run", None, None, {"argv": ["--profile", "2:9"]}, 2,
     "--profile 2:9 ends past train.steps (4); choose steps from 1 to 4", ["."]),
    ("peak-zero", None, None, {"argv": ["--peak-tflops", "0"]}, 2, "--peak-tflops must be a positive number", ["."]),
    ("peak-nan", None, None, {"argv": ["--peak-tflops", "nan"]}, 2, "of TFLOP/s per device (e.g. 989", ["."]),
    ("peak-not-a-number", None, None, {"argv": ["--peak-tflops", "fast"]}, 2, "TFLOP/s per device (e.g. 989 for an H100 in bfloat16), got 'fast'", ["."]),
    ("wandb-project-with-slash", None, None, ["logging.wandb_project=team/proj"], 2,
     "'logging.wandb_project' contains '/'; it must be a W&B project name", ["."]),
    ("wandb-project-blank", None, None, ["logging.wandb_project=' '"], 2, "'logging.wandb_project' is ' '", ["."]),
    ("tensorboard-not-a-bool", None, None, ["logging.tensorboard=sometimes"], 2, "'logging.tensorboard' must be", ["."]),
    ("compile-cache-not-a-bool", None, None, ["compile.cache=sometimes"], 2, "'compile.cache' must be", ["."]),
    ("compile-cache-dir-unwritable", None, None, ["compile.cache_dir=/proc/lite_tp_cache"], 2,
     "the compilation cache directory '/proc/lite_tp_cache' cannot be made", ["."]),
    ("compile-cache-dir-blank", None, None, ["compile.cache_dir=' '"], 2, "'compile.cache_dir' is empty", ["."]),
    ("resume-step-missing", TRAINED, None, {"argv": ["--resume-step", "3"]}, 2,
     "There is no checkpoint 3 in", ALL),
    ("resume-step-damaged", TRAINED, truncate_latest, {"argv": ["--resume-step", "4"]}, 2,
     "checkpoints/4 is damaged (", ALL),
    ("spike-factor-not-above-one", None, None, ["train.spike_factor=1"], 2,
     "'train.spike_factor' must be a number > 1 or null, got 1", ["."]),
    ("negative-batch-skip", None, None, ["rollback.skip_batches=-1"], 2,
     "'rollback.skip_batches' must be an integer >= 0 or null, got -1", ["."]),
    ("spike-policy-typo", None, None, ["train.on_spike=skip"], 2, "'train.on_spike' must be one of stop, rollback, ignore", ["."]),
    ("spike-step-past-the-end", None, None, ["fault.spike_step=5"], 2, "'fault.spike_step' (5) is past 'train.steps' (4)", ["."]),
    ("diverges-stop", None, None, ["train.lr=1e30", "checkpoint.every=1"], 4,
     "step 2: the update made parameters non-finite (loss ", ["checkpoints"]),
    ("diverges-skip", None, None, ["train.lr=1e30", "train.on_nonfinite=skip"], 0, "3 updates were skipped", []),
    ("diverges-rollback", None, None, ["train.lr=1e30", "checkpoint.every=1", "train.on_nonfinite=rollback", "rollback.max=1"],
     4, "step 2: the update made parameters non-finite (loss ", []),
    # round two: a new user's probe
    ("run-dir-foreign-folder", None, foreign_folder, [], 2, "is not a lite-tp run directory", ["notes.txt", "config.yaml"]),
    ("run-dir-empty-string", None, None, {"run_dir": ""}, 2, "--run-dir is empty", ["."]),
    ("empty-config-file", None, write_empty_yaml, {"config": "empty.yaml"}, 2, "is empty; give at least one section", ["."]),
    ("seq-len-beyond-memory", None, None, ["train.seq_len=100000"], 2, "needs about", ["."]),
    ("batch-beyond-memory", None, None, ["train.global_batch=100000000"], 2, "lower train.seq_len or train.global_batch", ["."]),
    ("cudnn-without-gpu", None, None, ["model.attention=cudnn"], 2, "'model.attention' is cudnn, which needs an NVIDIA GPU", ["."]),
    ("text-path-is-a-fifo", None, make_fifo, ["data.source=text", "data.path={tmp}/fifo.npy"], 2, "is not a regular file or a directory", ["."]),
    ("token-file-is-a-fifo", None, make_fifo, ["data.source=tokens", "data.path={tmp}/fifo.npy"], 2, "is not a regular file", ["."]),
    ("fewer-steps-than-done", TRAINED, None, ["train.steps=2", "train.lr=0.5"], 0, "", ALL),
    # context parallelism (issue 17)
    ("context-seq-not-divisible", None, None, ["mesh.context=2", "train.seq_len=30"], 2,
     "'train.seq_len' (30) must be divisible by 2 x 'mesh.context' (2) = 4 chunks (the load balance; "
     "or set 'model.context_load_balance' false)", ["."]),
    ("context-strategy-unknown", None, None, ["model.context_parallel=zigzag"], 2,
     "'model.context_parallel' must be one of all_gather, ring, all_to_all", ["."]),
    ("context-moe-with-capacity", None, None, ["model.moe_every=2", "mesh.context=2"], 2,
     "'model.capacity_factor' (1.25) must be null (dropless) with 'mesh.context' (2) > 1", ["."]),
    ("sequence-parallel-not-divisible", None, None,
     ["mesh.context=2", "mesh.tensor=4", "train.seq_len=12", "model.sequence_parallel=true"], 2,
     "'train.seq_len' (12) must be divisible by 'mesh.tensor' (4) x 'mesh.context' (2) with 'model.sequence_parallel'", ["."]),
    ("sequence-parallel-typo", None, None, ["model.sequence_parallel=maybe"], 2,
     "'model.sequence_parallel' must be one of auto, true, false, got 'maybe'", ["."]),
]


@pytest.mark.parametrize(
    "run_from, fault, overrides, code, fragment, unchanged", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_and_faults(run_from, fault, overrides, code, fragment, unchanged, request, tmp_path, capsys):
    run = tmp_path / "run"
    if run_from == TRAINED:
        shutil.copytree(request.getfixturevalue("trained_run"), run)
    options = overrides if isinstance(overrides, dict) else {}
    overrides = [] if isinstance(overrides, dict) else [o.format(tmp=tmp_path) for o in overrides]
    run_dir = options.get("run_dir", "run")
    run_dir = run_dir if os.path.isabs(run_dir) or not run_dir else str(tmp_path / run_dir)
    lock = None
    if fault == "hold_lock":
        lock = RunLock(run)
        lock.acquire()
    elif fault is not None:
        fault(run)
    config = options.get("config", str(TINY))
    config = str(tmp_path / config) if (tmp_path / config).is_file() else config  # one the fault wrote
    before = snapshot(run, unchanged) if run.is_dir() else None
    listing = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    try:
        got = main(["train", config, "--no-progress", "--run-dir", run_dir, "--set", *BASE, *overrides,
                    *options.get("argv", [])])
    finally:
        if lock is not None:
            lock.release()
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err
    assert all(line.startswith("lite-tp: ") for line in err.splitlines()), err  # no library log lines
    assert fragment.format(pid=os.getpid()) in err
    if fault is damage_metrics_line:  # the damaged line is dropped, the rest kept
        assert [step for step, _ in losses(run)] == [1, 3, 4]
    if "train.on_nonfinite=skip" in overrides:
        records = steps_of(run)
        assert [r["skipped"] for r in records] == [0, 1, 1, 1] and records[-1]["skipped_steps"] == 3
    if code:  # one error line (after any warnings about what was tried), nothing else
        assert [line for line in err.splitlines() if not line.startswith("lite-tp: warning:")] == [
            line for line in err.splitlines() if line.startswith("lite-tp: error:")
        ] and err.count("lite-tp: error:") == 1, err
    if before is not None:
        assert snapshot(run, unchanged) == before
    elif code == 2:  # bad input on a fresh run directory writes nothing at all
        assert sorted(p.name for p in tmp_path.iterdir()) == listing
    if "train.on_nonfinite=rollback" in overrides:  # back to checkpoint 1, batch 1 skipped; at lr 1e30 again
        assert "(train.on_nonfinite=rollback, after 1 rollbacks (rollback.max)); checkpoint 1 is intact" in err
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [(r["checkpoint"], r["skipped_batches"]) for r in records if r.get("event") == "rollback"] == [(1, [1, 2])]
    elif code == 4:  # stopped at step 2: checkpoint 1 is the last, nothing non-finite saved or logged
        assert "(train.on_nonfinite=stop); checkpoint 1 is intact" in err
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]
        assert [r["step"] for r in steps_of(run)] == [1]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["start"]) for r in records if r.get("event") == "spike"] == [(2, 2)]  # the spike is an event
    assert not (run / ".lock").exists() or fault == "hold_lock"
    if code == 0 and fault in (truncate_latest, flip_a_byte_in_latest, delete_half_of_latest, unreadable_manifest_in_latest,
                               nan_in_latest):
        finished = [r["step"] for r in steps_of(run)]
        assert finished == list(range(1, len(finished) + 1))  # each step once
        assert any(re.fullmatch(r"4\.damaged-\d+-\d+", p.name) for p in (run / "checkpoints").iterdir())


# ---- the other commands: the same promises --------------------------------------

HF = REPO / "tests" / "data" / "hf" / "llama2"


def hf_copy(tmp: Path, change=None) -> None:
    """A copy of a small Hugging Face model at ``tmp/hf``, then ``change(dir)``."""
    shutil.copytree(HF, tmp / "hf")
    if change is not None:
        change(tmp / "hf")


def edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def edit_yaml(path: Path, section: str, **changes) -> None:
    import yaml

    config = yaml.safe_load(path.read_text())
    config[section].update(changes)
    path.write_text(yaml.safe_dump(config))


def extra_layer_tensor(hf: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"model.layers.2.mlp.up_proj.weight": np.zeros((70, 48), np.float32)}, str(hf / "extra.safetensors"))


COMMAND_CASES = [
    # (id, setup(tmp) or None, argv ({tmp}, {tiny}, {trained}: a copy of the trained run in tmp), code, stderr fragment)
    ("set-before-config", None, ["train", "--set", "model.hiden_size=8", "{tiny}", "--run-dir", "{tmp}/run"], 2,
     "unknown key 'model.hiden_size'"),
    ("train-without-config", None, ["train", "--set", "train.steps=1", "--run-dir", "{tmp}/run"], 2, "needs a CONFIG file"),
    ("plan-huge-fake-mesh", None, ["plan", "{tiny}", "--set", "mesh.tensor=100000"], 2, "plausibly hosts at most"),
    ("plan-negative-memory", None, ["plan", "{tiny}", "--devices", "8", "--memory-gb", "-1"], 2,
     "--memory-gb: must be a positive number"),
    ("plan-nan-memory", None, ["plan", "{tiny}", "--devices", "8", "--memory-gb", "nan"], 2, "--memory-gb"),
    ("plan-empty-config", lambda t: write_empty_yaml(t / "run"), ["plan", "{tmp}/empty.yaml"], 2, "is empty"),
    ("bench-depths-not-numbers", None, ["bench", "{tiny}", "--depths", "abc"], 2, "--depths: must be layer counts"),
    ("bench-depth-zero", None, ["bench", "{tiny}", "--depths", "2,0"], 2, "--depths: must be layer counts"),
    ("bench-cudnn-without-gpu", None, ["bench", "{tiny}", "--set", "model.attention=cudnn"], 2, "needs an NVIDIA GPU"),
    ("convert-huge-tensor", hf_copy, ["convert", "--from-hf", "{tmp}/hf", "--run-dir", "{tmp}/run", "--tensor", "100000"], 2,
     "plausibly hosts at most"),
    ("convert-into-foreign-folder", lambda t: (hf_copy(t), foreign_folder(t / "run")),
     ["convert", "--from-hf", "{tmp}/hf", "--run-dir", "{tmp}/run"], 2, "is not a lite-tp run directory"),
    ("convert-unused-tensors", lambda t: hf_copy(t, extra_layer_tensor),
     ["convert", "--from-hf", "{tmp}/hf", "--run-dir", "{tmp}/run"], 2,
     "holds tensors its config.json does not use ('model.layers.2.mlp.up_proj.weight')"),
    ("convert-missing-field", lambda t: hf_copy(t, lambda d: edit_json(d / "config.json", num_attention_heads=None)),
     ["convert", "--from-hf", "{tmp}/hf", "--run-dir", "{tmp}/run"], 2, "hf/config.json (model_type 'llama') lacks the field 'num_attention_heads'"),
    ("convert-config-not-json", lambda t: hf_copy(t, lambda d: (d / "config.json").write_text("{oops")),
     ["convert", "--from-hf", "{tmp}/hf", "--run-dir", "{tmp}/run"], 2, "hf/config.json is not valid JSON"),
    ("convert-to-existing-file", lambda t: (t / "out.bin").write_text("mine"),
     ["convert", "--to-hf", "{tmp}/out.bin", "--run-dir", "{trained}"], 2, "out.bin is an existing file"),
    ("convert-to-nonempty-dir", lambda t: foreign_folder(t / "out"),
     ["convert", "--to-hf", "{tmp}/out", "--run-dir", "{trained}"], 2, "out exists and is not empty"),
    ("generate-empty-run-dir", None, ["generate", "--run-dir", "", "--prompt", "x"], 2, "--run-dir is empty"),
    ("generate-foreign-folder", lambda t: foreign_folder(t / "run"), ["generate", "--run-dir", "{tmp}/run", "--prompt", "x"], 2,
     "is not a lite-tp run directory"),
    ("generate-prompt-not-utf8", None, ["generate", "--run-dir", "{trained}", "--prompt", "caf\udce9"], 2,
     "--prompt: is not valid UTF-8 text"),
    ("generate-cache-beyond-memory", None, ["generate", "--run-dir", "{trained}", "--prompt", "x", "--max-new-tokens", "1000000000"],
     2, "a KV cache for 1000000000 new tokens needs about"),
    ("generate-hf-huge-tensor", hf_copy, ["generate", "--hf", "{tmp}/hf", "--tensor", "100000", "--prompt", "x"], 2,
     "plausibly hosts at most"),
    ("generate-hf-bad-tokenizer", lambda t: hf_copy(t, lambda d: (d / "tokenizer.json").write_text("{not a tokenizer")),
     ["generate", "--hf", "{tmp}/hf", "--prompt", "x", "--max-new-tokens", "1"], 2, "is not a tokenizer the tokenizers package can read"),
    ("generate-on-context-mesh", lambda t: edit_yaml(t / "trained" / "config.yaml", "mesh", context=2),
     ["generate", "--run-dir", "{trained}", "--prompt", "x"], 2, "lite-tp generate does not run on a context mesh"),
    ("launch-into-foreign-folder", lambda t: foreign_folder(t / "run"),
     ["launch", "--processes", "2", "--", "train", "{tiny}", "--run-dir", "{tmp}/run"], 2, "is not a lite-tp run directory"),
]


@pytest.mark.parametrize("setup, argv, code, fragment", [c[1:] for c in COMMAND_CASES], ids=[c[0] for c in COMMAND_CASES])
def test_bad_input_of_every_command(setup, argv, code, fragment, request, tmp_path, capsys):
    if any("{trained}" in a for a in argv):
        shutil.copytree(request.getfixturevalue("trained_run"), tmp_path / "trained")
    if setup is not None:
        setup(tmp_path)
    before = snapshot(tmp_path, ["."])
    capsys.readouterr()
    try:
        got = main([a.format(tmp=tmp_path, tiny=TINY, trained=tmp_path / "trained") for a in argv])
    except SystemExit as exit:  # argparse's own errors
        got = exit.code
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err and err.count("lite-tp: error:") == 1, err
    assert fragment in err, err
    assert snapshot(tmp_path, ["."]) == before  # nothing written, nothing overwritten


def test_table_has_at_least_60_cases():
    assert len(CASES) + len(COMMAND_CASES) >= 60


# ---- the behaviours under the table ------------------------------------------


@pytest.fixture(scope="module")
def tiny_step():
    config = load_config(TINY, ["mesh.tensor=2", "train.on_nonfinite=skip"])
    mesh = make_mesh_for(config.mesh.requested, spares=config.mesh.spares)
    model, optimizer = create_model_and_optimizer(config.model, config.train, mesh)
    step = decoder_step(model, optimizer, config.train)
    batches = Batches(load_tokens(config.data, 256), 8, config.train.seq_len, 0)
    batch = [jax.device_put(a, batch_sharding(mesh)) for a in batches.batch(0)]
    return model, optimizer, step, batch


def test_a_non_finite_update_is_dropped_inside_the_compiled_step(tiny_step):
    model, optimizer, step, batch = tiny_step
    for _ in range(2):  # the first call's inputs come from initialisation, later ones from a step
        assert float(step(batch)["skipped"]) == 0.0
    compiled = step._step._cache_size()
    scale = model.final_norm.scale[...]
    model.final_norm.scale[...] = jax.device_put(np.full(scale.shape, np.nan, np.float32), scale.sharding)
    before = export_state(nnx.state((model, optimizer)))
    metrics = step(batch)
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    after = export_state(nnx.state((model, optimizer)))
    for name in before:  # parameters, moments and the step counter as they were
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    model.final_norm.scale[...] = scale
    assert float(step(batch)["skipped"]) == 0.0
    assert step._step._cache_size() == compiled  # no recompile: one step for both outcomes


def test_save_refuses_non_finite_state(tmp_path):
    mesh = tp_mesh(2)
    layer = ParallelMLP(8, 12, mesh=mesh, rngs=nnx.Rngs(0))
    layer.up.kernel[...] = layer.up.kernel[...].at[0, 0].set(np.inf)
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
    with pytest.raises(NonFiniteError, match="refusing to save checkpoint 3: 'model.up.kernel' holds a NaN or infinity"):
        checkpointer.save(3, {"model": nnx.state(layer)}, {"step": 3})
    checkpointer.close()
    assert not (tmp_path / "ckpt").exists()


def test_rotation_keeps_the_newest_intact_checkpoint(tmp_path):
    layer = ParallelMLP(8, 12, mesh=tp_mesh(2), rngs=nnx.Rngs(0))
    writer = Checkpointer(tmp_path, keep=3)
    for step in (1, 2, 3):
        writer.save(step, {"model": nnx.state(layer)}, {"step": step})
    writer.close()
    truncate = _largest_data_file(tmp_path / "3")
    truncate.write_bytes(b"")
    shutil.rmtree(tmp_path / "2" / "model")
    resumed = Checkpointer(tmp_path, keep=1)  # newest kept: 3, damaged; 2 damaged; 1 intact
    resumed.rotate()
    resumed.close()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [1, 3]


def test_a_kill_between_commit_and_seal_leaves_a_usable_checkpoint(tmp_path):
    """No manifest (killed after orbax's rename, before the seal): restored if it reads and is finite."""
    mesh = tp_mesh(2)
    layer = ParallelMLP(8, 12, mesh=mesh, rngs=nnx.Rngs(0))
    writer = Checkpointer(tmp_path, keep=2)
    writer.save(5, {"model": nnx.state(layer)}, {"step": 5})
    writer.close()
    (tmp_path / "5" / MANIFEST).unlink()
    other = ParallelMLP(8, 12, mesh=mesh, rngs=nnx.Rngs(1))
    reader = Checkpointer(tmp_path, keep=2)
    progress = reader.restore({"model": nnx.state(other)}, mesh)
    reader.close()
    assert progress == {"step": 5}
    for name, value in export_state(other).items():
        np.testing.assert_array_equal(value, export_state(layer)[name])


def test_import_state_validates_every_entry_before_writing_any():
    mlp = ParallelMLP(8, 30, mesh=tp_mesh(3), rngs=nnx.Rngs(0))
    before = export_state(mlp)
    state = {name: np.full(v.shape, 7.0, np.float32) for name, v in before.items()}
    state["up.kernel"] = np.zeros((8, 29), np.float32)  # gate.kernel comes first and is fine
    with pytest.raises(ValueError, match=r"'up.kernel' has shape \(8, 29\), expected \(8, 30\)"):
        import_state(mlp, state)
    state["up.kernel"] = np.array([["x"] * 30] * 8)
    with pytest.raises(ValueError, match=r"'up.kernel' has dtype <U1, expected float32"):
        import_state(mlp, state)
    for name, value in export_state(mlp).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_run_lock_is_exclusive_and_released(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RuntimeError, match=f"in use by process {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda m: ColumnParallelLinear(0, 8, mesh=m, rngs=nnx.Rngs(0)), "ColumnParallelLinear in_features must be a positive integer, got 0"),
        (lambda m: RowParallelLinear(8, 4.0, mesh=m, rngs=nnx.Rngs(0)), "RowParallelLinear out_features must be a positive integer, got 4.0"),
        (lambda m: ParallelMLP(8, -4, mesh=m, rngs=nnx.Rngs(0)), "ParallelMLP hidden_features must be a positive integer, got -4"),
        (lambda m: VocabParallelEmbedding(True, 8, mesh=m, rngs=nnx.Rngs(0)), "VocabParallelEmbedding num_embeddings must be a positive integer, got True"),
        (lambda m: RMSNorm("8", mesh=m, rngs=nnx.Rngs(0)), "RMSNorm features must be a positive integer, got '8'"),
        (lambda m: MoEMLP(8, 16, num_experts=0, mesh=m, rngs=nnx.Rngs(0)), "MoEMLP num_experts must be a positive integer, got 0"),
        (lambda m: ParallelAttention(64, 0, mesh=m, rngs=nnx.Rngs(0)), "ParallelAttention num_heads must be a positive integer, got 0"),
    ],
    ids=["column", "row", "mlp", "embedding", "norm", "moe", "attention"],
)
def test_layer_constructors_reject_bad_sizes(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(make_mesh(tensor=2, devices=jax.devices()[:2]))


# ---- preemption and kill -9 during an asynchronous save ------------------------


def steps_of(run: Path) -> list[dict]:
    """The step records of ``metrics.jsonl`` (not its events: ``goodput``, restarts, takeovers)."""
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in steps_of(run)]


def test_ctrl_c_and_sigterm_checkpoint_at_the_step_boundary_and_the_rerun_continues_exactly(tmp_path, monkeypatch, capsys):
    """Ctrl-C after step 1 (exit 130), then SIGTERM after step 2 (exit 143): each
    saves the step just finished, and the reruns continue bitwise. Compared with
    an uninterrupted run in this same process: XLA's CPU kernels may sum in
    another order in a process holding 8 fake devices than in the one-device
    subprocess of ``trained_run`` (that comparison was flaky)."""
    import signal

    from lite_tp_jax.train import loop

    uninterrupted = tmp_path / "uninterrupted"
    assert main(["train", str(TINY), "--no-progress", "--run-dir", str(uninterrupted), "--set", *BASE]) == 0
    run = tmp_path / "run"
    argv = ["train", str(TINY), "--no-progress", "--run-dir", str(run), "--set", *BASE]
    for number, code, message, saved in ((signal.SIGINT, 130, "interrupted (Ctrl-C): checkpoint 1 saved", 1),
                                         (signal.SIGTERM, 143, "preempted (SIGTERM): checkpoint 2 saved", 2)):
        calls = []

        class SignalledAfterFirstStep:
            def __init__(self, step):
                self.step = step

            def __getattr__(self, name):
                return getattr(self.step, name)

            def __call__(self, batch):
                metrics = self.step(batch)
                calls.append(1)
                if len(calls) == 1:  # a real signal to this process, during training
                    os.kill(os.getpid(), number)
                return metrics

        real_step = loop.decoder_step
        monkeypatch.setattr(loop, "decoder_step", lambda *args, real=real_step, wrap=SignalledAfterFirstStep: wrap(real(*args)))
        assert main(argv) == code
        err = capsys.readouterr().err
        assert message in err and "rerun the same command to continue" in err, err
        assert Checkpointer(run / "checkpoints", keep=2).latest_step() == saved  # 1: not a multiple of checkpoint.every
        monkeypatch.undo()
    assert main(argv) == 0
    assert losses(run) == losses(uninterrupted)  # bitwise, each step once


def test_a_second_ctrl_c_stops_at_once():
    import signal

    from lite_tp_jax.runtime.preemption import PreemptionWatch

    with PreemptionWatch() as watch:
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.reached(1) and watch.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # the installed handler, called as the signal would call it
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_kill_during_an_async_save_resumes_exactly(trained_run, tmp_path):
    """kill -9 while checkpoint 4 is being written (its orbax temporary directory
    exists): the rerun resumes from checkpoint 2 and reproduces the run."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "lite_tp_jax.cli", "train", str(TINY), "--no-progress",
               "--run-dir", str(run), "--set", *BASE]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    in_flight = run / "checkpoints" / "4.orbax-checkpoint-tmp"
    while not in_flight.exists() and process.poll() is None:
        pass  # poll as fast as we can: the save takes tens of milliseconds
    process.kill()
    process.wait()
    assert in_flight.exists(), "the kill should land during the save of checkpoint 4"
    assert Checkpointer(run / "checkpoints", keep=2).latest_step() == 2
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert losses(run) == losses(trained_run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]


def test_model_mismatch_in_a_fresh_process_is_one_line(trained_run, tmp_path):
    """No orbax advice, no "Event loop is closed" traceback at exit."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "lite_tp_jax.cli", "train", str(TINY), "--no-progress", "--run-dir", str(run),
         "--set", *BASE, "model.num_kv_heads=4"], env=env, capture_output=True, text=True,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"lite-tp: error: Checkpoint {run}/checkpoints/4 does not match this model: "
        f"'model.layers.blocks.0.attention.key.kernel' is [2, 64, 2, 16] in the checkpoint but [2, 64, 4, 16] "
        f"in this model (a different model config? use another --run-dir to start afresh)."
    ]


def _disk_full_checks(run: Path, err: str, failed_step: int) -> None:
    """One line naming the directory and the bytes; the previous checkpoint intact; no temporary left."""
    assert "Traceback" not in err and err.count("lite-tp: error:") == 1, err
    assert f"checkpoint {failed_step} could not be written: {run / 'checkpoints'} has" in err
    assert "but a checkpoint needs about" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]  # no 4, no 4.orbax-checkpoint-tmp-*
    assert Checkpointer(run / "checkpoints", keep=2).latest_step() == 2
    assert not (run / ".lock").exists()


def test_a_disk_that_fills_up_stops_the_run_at_the_failed_save(tmp_path, monkeypatch, capsys):
    """Free space checked before each save: the save of step 4 finds the disk full."""
    from collections import namedtuple

    from lite_tp_jax.runtime import run_dir

    usage, real, calls = namedtuple("usage", "total used free"), shutil.disk_usage, []

    def filling(path):
        calls.append(path)
        return usage(1 << 30, 1 << 30, 0) if len(calls) > 2 else real(path)  # preflight, save 2: room; save 4: none

    monkeypatch.setattr(run_dir.shutil, "disk_usage", filling)
    run = tmp_path / "run"
    assert main(["train", str(TINY), "--no-progress", "--run-dir", str(run), "--set", *BASE]) == 2
    _disk_full_checks(run, capsys.readouterr().err, 4)


def test_a_save_that_fails_for_a_full_disk_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    """The asynchronous write itself fails (ENOSPC, as tensorstore reports it): its
    temporary directory is removed and the run stops with one line."""
    import errno

    import orbax.checkpoint as ocp

    real_wait = ocp.CheckpointManager.wait_until_finished
    waits = []

    def failing_wait(self):
        real_wait(self)
        final = Path(self.directory) / "4"
        if final.is_dir() and not waits:  # the write of step 4, as if it ran out of space before its rename
            waits.append(1)
            final.rename(final.with_name("4.orbax-checkpoint-tmp-1234"))
            raise ValueError("Error writing: [OSError] No space left on device") from OSError(errno.ENOSPC, "No space")

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", failing_wait)
    run = tmp_path / "run"
    assert main(["train", str(TINY), "--no-progress", "--run-dir", str(run), "--set", *BASE]) == 2
    _disk_full_checks(run, capsys.readouterr().err, 4)


def test_a_checkpoint_rotated_away_while_read_is_not_called_damaged(trained_run, tmp_path, capsys):
    """A reader beside a running writer: checkpoint 4 vanishes (rotation) during its
    read; the reader retries and restores the newest that is there, with no warning."""
    from lite_tp_jax.models.factory import abstract_model

    shutil.copytree(trained_run, tmp_path / "run")
    config = load_config(TINY, BASE)
    mesh = make_mesh_for(config.mesh.requested)
    model = abstract_model(config.model, mesh)
    reader = Checkpointer(tmp_path / "run" / "checkpoints", keep=2)
    real_read, reads = reader._read, []

    def read_while_rotating(step, variables, mesh):
        reads.append(step)
        if step == 4:
            shutil.rmtree(reader.directory / "4")  # the writer's rotation, mid-read
            raise FileNotFoundError("tensorstore: NOT_FOUND")
        return real_read(step, variables, mesh)

    reader._read = read_while_rotating
    capsys.readouterr()
    progress = reader.restore({"model": nnx.state(model)}, mesh)
    reader.close()
    assert progress["step"] == 2 and reads == [4, 2]
    assert "damaged" not in capsys.readouterr().err


def test_rerunning_a_finished_run_draws_no_bar_and_changes_nothing(trained_run, tmp_path, capsys):
    """The progress bar is on (no --no-progress): nothing to do shows one line, not a
    bar reading 'loss nan 0 tok/s'; a lower train.steps leaves config.yaml as it was."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = snapshot(run, ALL)
    assert main(["train", str(TINY), "--run-dir", str(run), "--set", *BASE, "train.steps=2"]) == 0
    out = capsys.readouterr().out
    assert out == f"nothing to do: {run} already holds step 4\n", out
    assert snapshot(run, ALL) == before
