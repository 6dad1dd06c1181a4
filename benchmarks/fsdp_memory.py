"""Peak memory per device of llama-8b's training step on 64 fake devices, by
sharding mode, read from the compiled step (compile only: abstract state,
nothing allocated), beside the planner's prediction (``planner.peak_bytes``).

    fsdp 8 x tensor 8                 parameters, gradients, moments split over fsdp; per-group gathers
    data 8 x tensor 8, shard_optimizer ZeRO-1: the moments split over data
    data 8 x tensor 8                 plain data parallelism

Each mode compiles in its own subprocess (64 fake CPU devices must be set
before jax starts, and one compile's caches should not shrink the next's).
Memory is ``compiled.memory_analysis()``: arguments + outputs + temporaries -
donated aliases (``analysis/bench.memory_bytes``). The issue's bound for fsdp:
(parameters + gradients + moments) / 64 + 2 layer groups' gathered weights +
activations, the activations measured: the plain data-parallel mode's
temporaries less its gradients (every mode holds the same rows per device,
so the same activations); the planner's activation estimate is shown too.

    PYTHONPATH=. python benchmarks/fsdp_memory.py [--out benchmarks/results/fsdp-memory-llama8b.md]
    PYTHONPATH=. python benchmarks/fsdp_memory.py --mode NAME   (one mode; what each subprocess runs)

``--set KEY=VALUE`` overrides apply to every mode (e.g. train.seq_len=2048).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = {
    "fsdp8-tensor8": ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=8"],
    "data8-tensor8-zero1": ["mesh.data=8", "mesh.tensor=8", "train.shard_optimizer=true"],
    "data8-tensor8": ["mesh.data=8", "mesh.tensor=8"],
}
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llama-8b.yaml"
GIB = 2**30


def measure(mode: str, overrides: list[str]) -> dict:
    """One mode, in this process (before jax starts)."""
    from lite_tp_jax.runtime.devices import provide_cpu_devices

    provide_cpu_devices(64)  # also lets XLA:CPU all-reduce bf16 in a partially manual region
    import jax
    import numpy as np

    from lite_tp_jax.analysis import planner
    from lite_tp_jax.analysis.bench import memory_bytes
    from lite_tp_jax.core.mesh import make_mesh_for
    from lite_tp_jax.run.config_file import load_config
    from lite_tp_jax.sharding.rules import batch_sharding
    from lite_tp_jax.train.decoder_step import decoder_step

    config = load_config(CONFIG, [*MODES[mode], *overrides])
    sizes = config.mesh.sizes(64)
    planned = planner.plan(config, sizes)
    mesh = make_mesh_for(sizes)
    model, optimizer = planner.abstract_model_and_optimizer(config.model, config.train, mesh)
    tokens = jax.ShapeDtypeStruct((config.train.global_batch, config.train.seq_len), np.int32,
                                  sharding=batch_sharding(mesh))
    started = time.perf_counter()
    compiled = decoder_step(model, optimizer, config.train).lower((tokens, tokens)).compile()
    seconds = time.perf_counter() - started
    analysis = compiled.memory_analysis()
    parts = planned["memory_per_device"]
    params = planner.parameters(model, mesh, optimizer)
    group = sum(p.fsdp_gathered for p in params if p.scanned) * planner.compute_itemsize(config.model)
    return {
        "mode": mode,
        "mesh": sizes,
        "compiled_peak_bytes": memory_bytes(compiled),
        "compiled": {k: int(getattr(analysis, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")},
        "planned": parts,
        "one_group_gathered_bytes": group,
        "compile_s": seconds,
    }


def run_all(overrides: list[str]) -> list[dict]:
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--mode", mode, *sum((["--set", o] for o in overrides), [])],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{mode}: compiled {rows[-1]['compiled_peak_bytes'] / GIB:.2f} GiB", file=sys.stderr)
    return rows


def table(rows: list[dict], overrides: list[str]) -> str:
    plain = next(r for r in rows if r["mode"] == "data8-tensor8")
    activations = plain["compiled"]["temp"] - plain["planned"]["gradients"]
    lines = [f"llama-8b training step, 64 fake CPU devices, compile only (configs/llama-8b.yaml"
             f"{', ' + ' '.join(overrides) if overrides else ''}); GiB per device. Activations measured "
             f"(data8-tensor8's temporaries less its gradients): {activations / GIB:.2f}", "",
             "| mode | compiled peak | planned peak | parameters | gradients | optimizer | gathered | activations (planner's estimate) | issue's bound | compiled / bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["planned"]
        stored = p["parameters"] + p["gradients"] + p["optimizer"]
        bound = stored + 2 * r["one_group_gathered_bytes"] + activations if r["one_group_gathered_bytes"] else None
        bound_text = "-" if bound is None else f"{bound / GIB:.2f}"
        ratio_text = "-" if bound is None else f"{r['compiled_peak_bytes'] / bound:.2f}"
        lines.append(
            f"| {r['mode']} | {r['compiled_peak_bytes'] / GIB:.2f} | {p['peak'] / GIB:.2f} | {p['parameters'] / GIB:.2f} | "
            f"{p['gradients'] / GIB:.2f} | {p['optimizer'] / GIB:.2f} | {p['gathered'] / GIB:.2f} | "
            f"{p['activations'] / GIB:.2f} | {bound_text} | {ratio_text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=list(MODES))
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.overrides)))
        return
    rows = run_all(args.overrides)
    text = table(rows, args.overrides)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
