"""Compile once: the persistent compilation cache, a first run against a second identical one.

    python benchmarks/compile_cache.py [--repeats 3] [--workloads tiny,wider] [--out FILE.md]

Per workload and repeat: a fresh, empty cache directory, then the same
``lite-tp train configs/tiny.yaml --set train.steps=3 ...`` twice, each in a new
process (so nothing is shared but the cache directory, ``compile.cache_dir``),
and once more with ``compile.cache=false`` (what every start cost before the
cache). Reported from each run's ``goodput`` event: the step's compile time
(``compile_s``: tracing, lowering and compiling or loading the step before
step 1) with the cache's hits and misses for it, the whole process's wall
time, and the ratio second / first. XLA's default flags (not the test
suite's fast-compile ones); ``$JAX_COMPILATION_CACHE_DIR`` is ignored (the
config names the directory).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import machine, write_report  # noqa: E402  benchmarks/report.py

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = {
    "tiny": ["mesh.tensor=2"],
    "wider": ["mesh.data=2", "mesh.tensor=4", "model.hidden_size=256", "model.num_layers=4", "model.num_heads=8",
              "model.num_kv_heads=4", "model.ffn_hidden_size=688", "train.seq_len=128"],
}


def run(run_dir: Path, overrides: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lite_tp_jax.cli", "train", str(REPO / "configs" / "tiny.yaml"),
                    "--no-progress", "--run-dir", str(run_dir), "--set", "train.steps=3", "checkpoint.every=3",
                    *overrides], env=env, check=True, capture_output=True)
    process_s = time.perf_counter() - started
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (goodput,) = [line for line in lines if line.get("event") == "goodput"]
    return {**goodput, "process_s": process_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default="tiny,wider")
    parser.add_argument("--out", help="markdown report, e.g. benchmarks/results/compile-cache-cpu.md")
    args = parser.parse_args()
    rows, ratios = [], {}
    load_before = os.getloadavg()[0]
    for name in args.workloads.split(","):
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                cache = [*WORKLOADS[name], f"compile.cache_dir={tmp / 'cache'}"]
                off = run(tmp / "off", [*WORKLOADS[name], "compile.cache=false"])
                first, second = run(tmp / "first", cache), run(tmp / "second", cache)
            ratio, xla = (second[k] / first[k] for k in ("compile_s", "xla_compile_s"))
            ratios.setdefault(name, []).append((ratio, xla))
            rows.append(
                f"| {name} | {repeat + 1} | {off['compile_s']:.2f} ({off['xla_compile_s']:.2f}) | "
                f"{first['compile_s']:.2f} ({first['xla_compile_s']:.2f}; {first['cache_hits']} hit, "
                f"{first['cache_misses']} miss) | {second['compile_s']:.2f} ({second['xla_compile_s']:.2f}; "
                f"{second['cache_hits']} hit, {second['cache_misses']} miss) | **{ratio:.1%}** | **{xla:.1%}** | "
                f"{off['process_s']:.1f} / {first['process_s']:.1f} / {second['process_s']:.1f} |"
            )
            print(rows[-1], flush=True)
    lines = [
        "# Compile once: the persistent compilation cache",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}; load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
        f"- command: `{' '.join(['.venv/bin/python', 'benchmarks/compile_cache.py', *sys.argv[1:]])}`",
        "- each run: `lite-tp train configs/tiny.yaml --set train.steps=3 checkpoint.every=3 <workload>` in a new "
        "process; `compile_s` of its `goodput` event (the step traced, lowered, then compiled or loaded, before "
        "step 1) and, in brackets, its XLA part `xla_compile_s` (`Lowered.compile()`: XLA, or the cache key and "
        "the load); first and second share a fresh cache directory, `off` runs with `compile.cache=false`",
        "",
        "| workload | # | off: compile (XLA) (s) | first run: compile (XLA) (s) | second run: compile (XLA) (s) "
        "| second / first | XLA part: second / first | process wall off / first / second (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        *(f"- {name}: median second / first: step compile **{statistics.median(r for r, _ in rs):.1%}**, its XLA "
          f"part **{statistics.median(x for _, x in rs):.1%}**" for name, rs in ratios.items()),
    ]
    print("\n".join(lines[-len(ratios):]))
    if args.out:
        write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
