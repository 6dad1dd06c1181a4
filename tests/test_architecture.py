"""The package's shape, held: the import-linter layers, a light supervisor and
a lazy top-level import, the CLI's error policy, and a training step that
still lowers for the GPU and TPU platforms no test machine has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lite_tp_jax.cli import main
from lite_tp_jax.core.mesh import make_mesh_for
from lite_tp_jax.run.config_file import load_config
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.sharding.rules import batch_sharding
from lite_tp_jax.train.decoder_step import decoder_step

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("jax", "jaxlib", "flax", "orbax", "optax")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold():
    """Layers ground to top, no upward import, no cycle (pyproject.toml's contracts)."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_launcher_imports_no_jax_flax_or_orbax():
    """``lite-tp launch`` reads the config and supervises; it never loads the model stack."""
    code = f"""
import sys
from lite_tp_jax import cli
from lite_tp_jax.runtime import launch, restart
code = cli.main(["launch", "--processes", "2", "--", "train", "configs/tiny.yaml", "--set", "mesh.spares=1"])
assert code == 2, code  # refused after reading and checking the config
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
assert not heavy, heavy
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "'mesh.spares' (1) replaces devices within one process" in result.stderr


def test_import_lite_tp_jax_loads_only_what_a_name_needs():
    code = """
import sys
import lite_tp_jax
assert "jax" not in sys.modules and "lite_tp_jax.core.mesh" not in sys.modules
assert lite_tp_jax.AXES[-1] == "tensor" and "jax" not in sys.modules
mlp = lite_tp_jax.ParallelMLP
assert "lite_tp_jax.layers.mlp" in sys.modules
for heavier in ("lite_tp_jax.train.step", "lite_tp_jax.run.checkpoint", "lite_tp_jax.interop.hf", "orbax.checkpoint"):
    assert heavier not in sys.modules, heavier
assert sorted(lite_tp_jax.__all__) == lite_tp_jax.__all__ and "ParallelMLP" in dir(lite_tp_jax)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_only_bad_input_exits_2_anything_else_is_a_bug_with_a_traceback(monkeypatch, capsys):
    from lite_tp_jax import cli
    from lite_tp_jax.core.errors import BadInput

    def raising(error):
        def command(args):
            raise error
        return command

    monkeypatch.setitem(cli.COMMANDS, "plan", raising(BadInput("the mesh is wrong; choose another.")))
    assert main(["plan", "configs/tiny.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == "lite-tp: error: the mesh is wrong; choose another.\n"
    monkeypatch.setitem(cli.COMMANDS, "plan", raising(ValueError("a programming error")))
    assert main(["plan", "configs/tiny.yaml"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: a programming error" in err


@pytest.mark.parametrize(
    "config, overrides, collectives",
    [
        ("tiny.yaml", ["mesh.data=2", "mesh.tensor=4", "model.sequence_parallel=true", "model.remat=selective"],
         ("all_gather", "reduce_scatter", "all_reduce")),
        ("tiny-moe.yaml", ["mesh.pipeline=2", "mesh.expert=2", "mesh.tensor=2"],
         ("all_to_all", "collective_permute", "all_reduce", "custom_call @ragged_all_to_all")),
    ],
    ids=["data2-tensor4-sp-remat", "moe-pipeline2-expert2-tensor2"],
)
def test_the_training_step_lowers_for_gpu_and_tpu(config, overrides, collectives):
    """No GPU or TPU here: ``jax.export`` lowers the step for both without one, so
    a change that would break those platforms fails here. (The ``cudnn``
    attention kernel needs a GPU at trace time: the configs use ``xla``.)"""
    config = load_config(REPO / "configs" / config, [*overrides, "model.attention=xla", "train.global_batch=8",
                                                     "train.seq_len=16"])
    mesh = make_mesh_for(config.mesh.requested)
    step = decoder_step(*create_model_and_optimizer(config.model, config.train, mesh), config.train)
    tokens = jax.ShapeDtypeStruct((config.train.global_batch, config.train.seq_len), np.int32,
                                  sharding=batch_sharding(mesh))
    exported = step.export((tokens, tokens), platforms=("cuda", "tpu"))
    assert exported.platforms == ("cuda", "tpu")
    text = exported.mlir_module()
    for collective in collectives:  # the explicit collectives survive lowering for both
        assert f"stablehlo.{collective}" in text, collective
    # The MoE exchange: ragged (only the rows sent) on GPU and TPU; the padded all-to-all is CPU's.
    assert ("ragged_all_to_all" in text) == ("expert" in " ".join(overrides))


def test_the_mesh_axes_are_declared_once():
    """``core.axes.AXES`` is the one declaration: the config's mesh section, the
    mesh and the planner's mesh ranking follow it."""
    import dataclasses

    from lite_tp_jax.analysis.planner import factorisations
    from lite_tp_jax.core.axes import AXES
    from lite_tp_jax.run.config import MeshConfig

    assert [f.name for f in dataclasses.fields(MeshConfig)] == [*AXES, "spares"]
    assert MeshConfig(tensor=-1).sizes(8) == dict.fromkeys(AXES, 1) | {"tensor": 8}
    assert tuple(make_mesh_for({"tensor": 2}).axis_names) == AXES
    assert all(tuple(sizes) == AXES and np.prod(list(sizes.values())) == 4 for sizes in factorisations(4))
