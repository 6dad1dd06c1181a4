"""``lite-tp plan`` against the compiled training step, over a matrix of meshes.

    python benchmarks/planner_check.py [--out FILE.md]

For tiny.yaml, tiny-moe.yaml and a 2-layer llama-1b.yaml (seq 32, batch 8,
2 microbatches; never materialised), at TP 2, 4 and 8, with and without
sequence parallelism, with and without pipeline 2 (and expert 2 for the
MoE model): the planner's collective result bytes per device per step
(Megatron's formulas, ``lite_tp_jax.analysis.planner``) against those of the real
training step, lowered for abstract state and compiled
(``planner.compiled_bytes_by_axis``: ``hlo.bytes_by_axis``, loop bodies times
their trip counts). Per mesh: the totals, the worst mesh axis, and the
compiled bytes by axis. The planner does not predict scalars (loss
statistics, the gradient norm): they are the whole difference. "No-op" is
compiled collectives whose groups are single devices (nothing moves; an
all-reduce over a size-1 axis kept in a region).
"""

from __future__ import annotations

import argparse
import os
import sys

from lite_tp_jax.runtime.devices import provide_cpu_devices

provide_cpu_devices(8)

from lite_tp_jax.analysis import planner  # noqa: E402
from lite_tp_jax.run.config_file import load_config  # noqa: E402
from report import machine, write_report  # noqa: E402  benchmarks/report.py

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
LLAMA_2_LAYERS = ["model.num_layers=2", "train.seq_len=32", "train.global_batch=8", "train.microbatches=2"]
MESHES = [
    ["mesh.tensor=8"],
    ["mesh.data=2", "mesh.tensor=4"],
    ["mesh.data=4", "mesh.tensor=2"],
    ["mesh.pipeline=2", "mesh.tensor=4", "train.microbatches=2"],
    ["mesh.data=2", "mesh.pipeline=2", "mesh.tensor=2", "train.microbatches=2"],
]
CASES = [
    *(("tiny.yaml", mesh) for mesh in MESHES),
    *(("tiny-moe.yaml", mesh) for mesh in MESHES),
    ("tiny-moe.yaml", ["mesh.expert=2", "mesh.tensor=4"]),
    ("tiny-moe.yaml", ["mesh.pipeline=2", "mesh.expert=2", "mesh.tensor=2"]),
    *(("llama-1b.yaml", [*LLAMA_2_LAYERS, *mesh]) for mesh in MESHES),
]
TOLERANCE = 0.01  # the bar, on the total


def check(name: str, overrides: list[str]) -> dict:
    config = load_config(os.path.join(CONFIGS, name), ["mesh.data=1", *overrides])
    sizes = planner.mesh_sizes(config, 8)
    predicted = planner.plan(config, sizes)["collective_bytes_by_axis"]
    compiled = planner.compiled_bytes_by_axis(config, sizes)
    no_op = compiled.pop("none", 0)
    axes = sorted(set(predicted) | set(compiled))
    errors = {a: (abs(predicted.get(a, 0) - compiled.get(a, 0)), max(compiled.get(a, 0), 1)) for a in axes}
    worst = max(axes, key=lambda a: errors[a][0])  # most bytes off (an unpredicted scalar is 100% of 8 bytes)
    total_p, total_c = sum(predicted.values()), sum(compiled.values())
    return {
        "config": name, "overrides": " ".join(overrides), "predicted": total_p, "compiled": total_c,
        "error": abs(total_p - total_c) / total_c, "worst": worst,
        "worst_error": errors[worst][0] / errors[worst][1], "worst_bytes": errors[worst][0],
        "by_axis": ", ".join(f"{a} {b / 2**20:.3f}" for a, b in compiled.items()) + " MiB", "no_op": no_op,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="markdown report (e.g. benchmarks/results/planner-vs-compiled.md)")
    args = parser.parse_args(argv)
    lines = [
        "# `lite-tp plan` vs the compiled training step",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/planner_check.py` (module docstring: what is compared).",
        "Every row: `lite-tp plan CONFIG --set ... --check` prints the same two numbers.",
        "",
        "| config | overrides | predicted B | compiled B | error (total) | axis most bytes off: error (bytes) "
        "| compiled, by axes | no-op B |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    rows = []
    for name, overrides in CASES:
        for sp in (False, True):
            row = check(name, [*overrides, f"model.sequence_parallel={str(sp).lower()}"])
            rows.append(row)
            lines.append(
                f"| {row['config']} | {row['overrides']} | {row['predicted']:,} | {row['compiled']:,} "
                f"| {row['error']:.1e} | {row['worst']}: {row['worst_error']:.1e} ({row['worst_bytes']:,}) "
                f"| {row['by_axis']} | {row['no_op']:,} |"
            )
            print(lines[-1], flush=True)
    worst = max(rows, key=lambda r: r["error"])
    lines += ["", f"{len(rows)} meshes; largest error of the total {worst['error']:.1e} "
              f"({worst['config']} {worst['overrides']}); all within {TOLERANCE:.0%}: "
              f"{all(r['error'] <= TOLERANCE for r in rows)}."]
    print(lines[-1])
    if args.out:
        write_report(lines, args.out)
    return 0 if all(r["error"] <= TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
