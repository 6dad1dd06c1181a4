"""The planner against the real thing: parameter bytes against the model's
shards, collective bytes against the compiled training step (counted by
``lite_tp_jax.core.hlo``), and the ``lite-tp plan`` command.

The full matrix (tiny, tiny-moe, 2-layer llama-1b at TP 2/4/8, with and
without SP, pipeline 2) is run with ``lite-tp plan ... --check`` (see
benchmarks/README.md); compiling it takes minutes, so CI runs a subset that
exercises every formula: a tied embedding over data x tensor with replicated
k/v heads, with SP; MoE layer groups (a dense and an MoE block) over
pipeline x expert x tensor without SP, with an untied head.
"""

import json
import math
from pathlib import Path

import jax
import pytest
from flax import nnx

from lite_tp_jax import cli
from lite_tp_jax.analysis import planner
from lite_tp_jax.core.mesh import make_mesh_for
from lite_tp_jax.analysis.profiles import PROFILES
from lite_tp_jax.core.axes import AXES
from lite_tp_jax.run.config_file import load_config
from lite_tp_jax.run.optimizer import create_model_and_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LLAMA_2_LAYERS = ["model.num_layers=2", "train.seq_len=32", "train.global_batch=8", "train.microbatches=2"]


def config(name, *overrides):
    return load_config(CONFIGS / name, overrides)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny.yaml", ["mesh.data=2", "mesh.tensor=4", "model.tie_embeddings=true", "model.sequence_parallel=true"]),
        ("tiny-moe.yaml", ["mesh.pipeline=2", "mesh.expert=2", "mesh.tensor=2"]),
    ],
    ids=["tiny-tied-d2-t4-sp", "moe-p2-e2-t2"],
)
def test_collective_bytes_match_the_compiled_step(name, overrides):
    cfg = config(name, *overrides)
    sizes = cfg.mesh.sizes(8)
    planned = planner.plan(cfg, sizes)
    compiled = planner.compiled_bytes_by_axis(cfg, sizes)
    predicted = planned["collective_bytes_by_axis"]
    for axes in set(predicted) | set(compiled):  # scalars (loss statistics, grad norm) are not predicted
        measured = compiled.get(axes, 0)
        assert abs(predicted.get(axes, 0) - measured) <= max(0.01 * measured, 256), (axes, predicted, compiled)
    total = sum(compiled.values())
    assert abs(planned["collective_bytes_per_step_per_device"] - total) <= 0.01 * total


def test_param_and_optimizer_bytes_are_the_real_shards():
    """tiny on data 2 x tensor 3 (uneven: padded shards), materialised."""
    cfg = config("tiny.yaml", "mesh.data=2", "mesh.tensor=3")
    sizes = cfg.mesh.sizes()
    model, optimizer = create_model_and_optimizer(cfg.model, cfg.train, make_mesh_for(sizes))
    planned = planner.plan(cfg, sizes)
    real = {".".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    per_param = {p["name"]: p["bytes_per_device"] for p in planned["parameters"]}
    assert per_param.keys() == real.keys()
    for name, value in real.items():
        assert {s.data.nbytes for s in value.addressable_shards} == {per_param[name]}, name
    moments = jax.tree.leaves(nnx.state(optimizer, nnx.optimizer.OptState))
    assert planned["optimizer_bytes_per_device"] == sum(leaf.addressable_shards[0].data.nbytes for leaf in moments)
    assert planned["param_bytes_per_device"] == sum(per_param.values())


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny-moe.yaml", ["mesh.expert=2", "mesh.tensor=3"]),
        ("tiny-moe.yaml", ["mesh.pipeline=2", "mesh.tensor=3", "model.virtual_stages=1"]),
        ("llama-1b.yaml", [*LLAMA_2_LAYERS, "mesh.tensor=8"]),
    ],
    ids=["moe-e2-t3", "moe-p2-t3", "llama1b-2layers-t8"],
)
def test_param_bytes_are_the_abstract_shards(name, overrides):
    """Models too big to materialise in CI: the shardings eval_shape gives each
    array (the same jitted initialisers, traced) say how big a shard is."""
    cfg = config(name, *overrides)
    sizes = cfg.mesh.sizes(8)
    mesh = make_mesh_for(sizes)
    model, _ = planner.abstract_model_and_optimizer(cfg.model, cfg.train, mesh)
    params = {p.name: p.bytes_per_device for p in planner.parameters(model, mesh)}
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        struct = v.get_raw_value()
        shard = struct.sharding.shard_shape(struct.shape)
        assert params[".".join(map(str, path))] == math.prod(shard) * struct.dtype.itemsize
    if name == "llama-1b.yaml":
        assert params["embed.embedding"] == -(-cfg.model.vocab_size // 8) * cfg.model.hidden_size * 4


def test_ranking_covers_every_valid_mesh():
    cfg = config("tiny.yaml")
    rows = planner.rank_meshes(cfg, 8, memory_gb=80, profile=PROFILES["h100"])
    meshes = [tuple(r["mesh"].values()) for r in rows]
    expected = {m for m in (tuple(s.values()) for s in planner.factorisations(8))
                if planner.check_mesh(cfg, dict(zip(AXES, m))) is None}
    # no expert axis (dense), <= 2 stages: (data, fsdp, context, tensor) over 8 = 20, and 10 over 4 with 2 stages
    assert set(meshes) == expected and len(meshes) == len(expected) == 30
    assert any(r["mesh"]["fsdp"] == 8 for r in rows) and any(r["mesh"]["context"] == 8 for r in rows)
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)
    assert all(r["fits"] for r in rows)
    assert not any(r["fits"] for r in planner.rank_meshes(cfg, 8, memory_gb=1e-6, profile=PROFILES["h100"]))
    pipelined = next(r for r in rows if r["mesh"]["pipeline"] == 2)
    assert pipelined["bubble_fraction"] == pytest.approx(1 / 2)  # 1 microbatch, 2 stages


def test_cli_plan_json(capsys):
    assert cli.main(["plan", str(CONFIGS / "tiny.yaml"), "--set", "mesh.tensor=2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("param_bytes_per_device", "optimizer_bytes_per_device", "activation_bytes_per_device",
                "collective_bytes_per_step_per_device", "collective_bytes_by_axis"):
        assert key in out
    assert out["collective_bytes_per_step_per_device"] == sum(out["collective_bytes_by_axis"].values())
    assert out["optimizer_bytes_per_device"] >= 2 * out["param_bytes_per_device"]  # AdamW: two moments


def test_cli_plan_bad_input_exits_2(capsys):
    tiny = str(CONFIGS / "tiny.yaml")
    assert cli.main(["plan", tiny, "--set", "mesh.tensor=3", "model.sequence_parallel=true"]) == 2
    assert "'train.seq_len' (64) must be divisible by 'mesh.tensor' (3)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", tiny, "--devices", "8", "--device-profile", "h300"])
    assert exit_info.value.code == 2
    assert cli.main(["plan", str(CONFIGS / "llama-1b.yaml")]) == 2  # data: -1 needs --devices
    assert "--devices" in capsys.readouterr().err


def test_roofline_prices_each_axis_by_its_link():
    profile = PROFILES["h100"].__class__("test", 1e12, 1e9, intra_node_bytes_per_s=1e9,
                                         inter_node_bytes_per_s=1e8, devices_per_node=4)
    cfg = config("tiny.yaml", "train.microbatches=3")
    planned = {"flops_per_step_per_device": 2e12, "collectives": [
        {"kind": "all-reduce", "axes": ("tensor",), "bytes": 4e6},               # ring: 2 (4-1)/4 per byte
        {"kind": "all-gather", "axes": ("data", "tensor"), "bytes": 8e6},        # 8 ranks: 7/8, slowest link
        {"kind": "collective-permute", "axes": ("pipeline",), "bytes": 1e6}]}
    sizes = {"data": 2, "pipeline": 2, "expert": 1, "tensor": 4}
    est = planner.estimate_step_seconds(cfg, sizes, planned, profile)
    assert est["bubble_fraction"] == pytest.approx(1 / 4)  # (p - 1) / (m + p - 1)
    assert est["compute_s"] == pytest.approx(2.0 / (1 - 1 / 4))
    assert est["communication_s"] == pytest.approx(4e6 * 1.5 / 1e9 + 8e6 * 7 / 8 / 1e8 + 1e6 / 1e8)
    wide = planner.estimate_step_seconds(cfg, {**sizes, "tensor": 8}, planned, profile)  # tensor leaves the node
    assert wide["communication_s"] > est["communication_s"]
