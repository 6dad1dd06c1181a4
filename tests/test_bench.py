"""``lite-tp bench``: the structure of its result on a one-layer model (no
timings are asserted: speed is measured by running the command, see
benchmarks/README.md)."""

import json
from pathlib import Path

from lite_tp_jax import cli

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
SMALL = ["mesh.tensor=2", "model.num_layers=1", "train.seq_len=16", "train.global_batch=2"]


def test_bench_reports_three_variants_ratios_and_depths(tmp_path, capsys):
    out = tmp_path / "results" / "bench.json"
    code = cli.main(["bench", TINY, "--set", *SMALL, "--steps", "2", "--depths", "1", "--json", "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert out.with_suffix(".png").stat().st_size > 0
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    assert printed["mesh"] == {"data": 1, "pipeline": 1, "expert": 1, "fsdp": 1, "context": 1, "tensor": 2}
    assert printed["same_work_max_rel_err"] < 1e-4  # the baseline computes the same losses and norms
    assert set(printed["variants"]) == {"lite_tp_jax", "gspmd", "one_device"}
    for name, v in printed["variants"].items():
        assert len(v["step_s"]) == 2 and v["median_step_s"] > 0 and v["compile_s"] > 0, name
        assert v["memory_bytes_per_device"] > 0, name
    ours, single = printed["variants"]["lite_tp_jax"], printed["variants"]["one_device"]
    assert set(ours["collective_bytes_by_axis"]) == {"tensor"} and ours["collective_bytes_per_step_per_device"] > 0
    assert single["collective_bytes_per_step_per_device"] == 0
    for ratio in printed["ratios"].values():
        assert ratio["q1"] <= ratio["median"] <= ratio["q3"]
    sp = printed["sequence_parallel_memory_bytes_per_device"]  # the default (auto) is on at tensor 2; both compiled
    assert sp["chosen"] == "sequence parallelism on (auto: tensor 2)" and sp["on"] == ours["memory_bytes_per_device"]
    assert sp["off"] > 0
    (row,) = printed["compile_vs_depth"]
    assert row["num_layers"] == 1 and row["lite_tp_jax_compile_s"] > 0 and row["gspmd_compile_s"] > 0


def test_bench_refuses_what_its_baseline_cannot_run(tmp_path, capsys):
    moe = str(Path(TINY).with_name("tiny-moe.yaml"))
    out = tmp_path / "bench.json"
    assert cli.main(["bench", moe, "--out", str(out)]) == 2
    assert "model.moe_every=0" in capsys.readouterr().err and not out.exists()
    assert cli.main(["bench", TINY, "--set", "mesh.pipeline=2"]) == 2
    assert "mesh.pipeline=1" in capsys.readouterr().err
    assert cli.main(["bench", TINY, "--steps", "1"]) == 2
    assert "at least 2 timed steps" in capsys.readouterr().err


def test_bench_names_what_gspmd_keeps_whole():
    """At tensor 8 the tiny model's 4 heads and 172 hidden units do not divide: GSPMD
    replicates those kernels (fewer bytes), lite_tp_jax pads and splits them."""
    from lite_tp_jax.analysis.bench import gspmd_replicated
    from lite_tp_jax.core.mesh import make_mesh_for
    from lite_tp_jax.models.factory import abstract_model
    from lite_tp_jax.run.config_file import load_config

    config = load_config(TINY)
    for tensor, expected in ((8, {"attention.query.kernel", "attention.out.kernel", "mlp.up.kernel"}), (2, set())):
        mesh = make_mesh_for({"tensor": tensor})
        names = {n.split(".", 3)[-1] for n in gspmd_replicated(abstract_model(config.model, mesh), mesh)}
        assert expected <= names and (expected or not names), names
