"""Checkpoint formats: format 2 holds the model and the optimizer as separate
items, so generation and conversion restore the model alone, building no
optimizer; a format-1 checkpoint (one ``state`` item holding the (model,
optimizer) pair as ``0/...`` and ``1/...``, as written before) still restores."""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from lite_tp_jax import export_state
from lite_tp_jax.cli import main
from lite_tp_jax.core.mesh import make_mesh
from lite_tp_jax.inference.loading import load_trained_model
from lite_tp_jax.run.checkpoint import FORMAT, MANIFEST, Checkpointer, write_manifest
from lite_tp_jax.run.config import Config, MeshConfig, TrainConfig
from lite_tp_jax.run.config_file import dump_config
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.sharding.state import flat_variables, to_logical

MODEL = ModelConfig(num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_hidden_size=40)
CONFIG = Config(model=MODEL, mesh=MeshConfig(tensor=2))


def trained(seed: int):
    """A model and optimizer on tensor 2 whose moments are not zero."""
    mesh = make_mesh(tensor=2, devices=jax.devices()[:2])
    model, optimizer = create_model_and_optimizer(MODEL, TrainConfig(seed=seed), mesh)
    nnx.update(optimizer, jax.tree.map(lambda x: x + np.asarray(seed + 1, x.dtype), nnx.state(optimizer)))
    return model, optimizer, mesh


def write_format_1(run_dir, model, optimizer, step: int) -> None:
    """A checkpoint as the first format wrote it: the pair's logical arrays under
    ``0/...`` and ``1/...`` in one ``state`` item, and a manifest of files only."""
    arrays = {name: to_logical(v) for name, v in flat_variables(nnx.state((model, optimizer)), "/").items()}
    manager = ocp.CheckpointManager(
        run_dir / "checkpoints", options=ocp.CheckpointManagerOptions(create=True), item_names=("state", "progress"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "progress": ocp.JsonCheckpointHandler()},
    )
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                               progress=ocp.args.JsonSave({"step": step, "data_position": step})))
    manager.wait_until_finished()
    manager.close()
    write_manifest(run_dir / "checkpoints" / str(step))
    manifest = run_dir / "checkpoints" / str(step) / MANIFEST
    manifest.write_text(json.dumps(json.loads(manifest.read_text())["files"]))  # format 1's: files at the top level
    dump_config(CONFIG, run_dir / "config.yaml")


@pytest.fixture(scope="module")
def format_1_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("format1") / "run"
    model, optimizer, _ = trained(seed=3)
    write_format_1(run, model, optimizer, step=4)
    return run, export_state(nnx.state((model, optimizer)))


def test_a_format_1_checkpoint_restores_model_and_optimizer(format_1_run):
    run, saved = format_1_run
    model, optimizer, mesh = trained(seed=0)
    checkpointer = Checkpointer(run / "checkpoints", keep=2)
    assert checkpointer.restore({"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, mesh) == {
        "step": 4, "data_position": 4}
    checkpointer.close()
    restored = export_state(nnx.state((model, optimizer)))
    assert restored.keys() == saved.keys() and any(name.startswith("1.") for name in saved)
    for name in saved:
        np.testing.assert_array_equal(restored[name], saved[name], err_msg=name)


def test_generation_restores_the_model_alone_from_either_format(format_1_run, tmp_path, monkeypatch, capsys):
    run, saved = format_1_run
    model, optimizer, _ = trained(seed=5)
    new = tmp_path / "run"
    checkpointer = Checkpointer(new / "checkpoints", keep=2)
    checkpointer.save(2, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, {"step": 2})
    checkpointer.close()
    dump_config(CONFIG, new / "config.yaml")
    manifest = json.loads((new / "checkpoints" / "2" / MANIFEST).read_text())
    assert manifest["format"] == FORMAT == 2 and {"model", "optimizer"} <= {path.name for path in (new / "checkpoints" / "2").iterdir()}

    def no_optimizer(*args, **kwargs):
        raise AssertionError("generation built an optimizer")

    monkeypatch.setattr(nnx, "Optimizer", no_optimizer)
    for run_dir, expected in ((run, {n[2:]: v for n, v in saved.items() if n.startswith("0.")}),
                              (new, export_state(model))):
        loaded = export_state(load_trained_model(run_dir))
        assert loaded.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(loaded[name], expected[name], err_msg=f"{run_dir.name} {name}")
    assert main(["generate", "--run-dir", str(run), "--prompt", "ab", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("ab")
