"""Greedy generation with the KV cache against the path without one, at several
TP degrees, in one process.

    python benchmarks/generate.py [--tensor 1,2,4] [--batch 4] [--prompt-len 32]
                                  [--new-tokens 64] [--repeats 3] [--out FILE.md]

    cache     lite_tp_jax.inference.generator.Generator: prefill once, then one decode step
              per token over fixed-size cache buffers (kv heads split over "tensor")
    no cache  lite_tp_jax.inference.generator.greedy_without_cache: the whole window
              [batch, prompt + new tokens] through the model for every token

Same weights at every degree. Both paths are compiled and warmed up first and
must produce the same tokens (checked); then every (degree, path) runs
interleaved ``--repeats`` rounds. Tokens per second count new tokens of all
rows (batch x new tokens / seconds, the prefill included); ratios are medians
of per-round ratios with the interquartile range. Without an accelerator the
script asks for fake CPU devices (they share the host's cores: the times
measure overhead, not speed-up). See benchmarks/README.md.
"""

from __future__ import annotations

import os

import jax

if os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
    jax.config.update("jax_num_cpu_devices", 8)  # before any jax operation

import argparse
import datetime
import platform
import statistics
import sys
import time

import flax
import numpy as np
from flax import nnx

from lite_tp_jax.inference.generator import Generator, greedy_without_cache
from lite_tp_jax.core.mesh import make_mesh
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.transformer import Transformer
from report import machine, write_report  # benchmarks/report.py

MODEL = ModelConfig(vocab_size=256, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, ffn_hidden_size=688)
PATHS = ("cache", "no cache")


def _quartiles(values: list[float]) -> str:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return f"{median:.2f} ({q1:.2f}–{q3:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensor", default="1,2,4", help="comma-separated TP degrees")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the markdown report here")
    args = parser.parse_args()
    degrees = [int(t) for t in args.tensor.split(",")]

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, MODEL.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]

    runs, compile_s, tokens = {}, {}, {}
    for tp in degrees:
        mesh = make_mesh(tensor=tp, devices=jax.devices()[:tp])
        model = Transformer(MODEL, mesh=mesh, rngs=nnx.Rngs(0))
        generator = Generator(model)
        runs[tp, "cache"] = lambda g=generator: list(g.stream(prompts, args.new_tokens))
        runs[tp, "no cache"] = lambda m=model: list(greedy_without_cache(m, prompts, args.new_tokens))
        for path in PATHS:  # compile and warm up; the paths must agree token for token
            started = time.perf_counter()
            tokens[tp, path] = np.stack(runs[tp, path]())
            compile_s[tp, path] = time.perf_counter() - started
    reference = tokens[degrees[0], "no cache"]
    mismatched = [key for key, value in tokens.items() if not np.array_equal(value, reference)]
    if mismatched:
        sys.exit(f"greedy tokens differ from TP {degrees[0]} without cache for {mismatched}")

    seconds = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[key].append(time.perf_counter() - started)

    new = args.batch * args.new_tokens
    lines = [
        "# Generation: KV cache vs no cache (greedy)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- jax {jax.__version__}, flax {flax.__version__}, python {platform.python_version()}",
        f"- command: `{' '.join(['python', *sys.argv])}`",
        f"- model: hidden {MODEL.hidden_size}, {MODEL.num_layers} layers, {MODEL.num_heads} heads / "
        f"{MODEL.num_kv_heads} kv, ffn {MODEL.ffn_hidden_size}, vocab {MODEL.vocab_size}; random weights",
        f"- batch {args.batch} prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens each "
        f"({new} per run); {args.repeats} interleaved rounds after a warm-up run",
        f"- greedy tokens: identical for every degree and path ({reference.size} tokens compared)",
        "",
        "| TP | path | tokens/s, median (IQR) | s per run | cache / no cache speed | first run (compile) s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for tp in degrees:
        ratios = [b / a for a, b in zip(seconds[tp, "cache"], seconds[tp, "no cache"])]
        for path in PATHS:
            rates = [new / s for s in seconds[tp, path]]
            ratio = _quartiles(ratios) if path == "cache" else "1"
            lines.append(
                f"| {tp} | {path} | {_quartiles(rates)} | {statistics.median(seconds[tp, path]):.3f} | "
                f"{ratio} | {compile_s[tp, path]:.1f} |"
            )
    print("\n".join(lines))
    if args.out:
        write_report(lines, args.out)


if __name__ == "__main__":
    main()
