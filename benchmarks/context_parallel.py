"""Context parallelism: per-device memory of the compiled step by sequence length, and step time.

    python benchmarks/context_parallel.py [--seqs 2048 4096 8192 16384 32768] [--budget-gib 2]
        [--strategies all_gather all_to_all ring] [--time-seq 2048] [--out FILE.md]

On 8 fake CPU devices, a 4-layer 256-wide decoder (8 heads of 32, SwiGLU 688,
vocabulary 256, one row, float32, remat full, the ``xla`` attention kernel):
the loss and its gradients are compiled (never run) for every sequence length
S and mesh, and ``compiled.memory_analysis().temp_size_in_bytes`` (the
temporaries: activations and the backward's buffers; parameters are arguments)
is read per device, for

    tensor 8 with sequence parallelism (the baseline: no context axis);
    tensor 2 x context 4, each strategy;
    context 8, each strategy;
    one device (for the ratio against n * t = 8).

The longest S whose temporaries fit the budget (2 GiB) is reported per mesh.
Then, at ``--time-seq``, the step time of each context strategy at tensor 2 x
context 4 against tensor 8 alone, as ratios measured in one process (on fake
CPU devices these time overhead and work per device, not links).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lite_tp_jax.core.mesh import make_mesh  # noqa: E402
from lite_tp_jax.layers.attention import CONTEXT_STRATEGIES  # noqa: E402
from lite_tp_jax.models.config import ModelConfig  # noqa: E402
from lite_tp_jax.models.transformer import Transformer  # noqa: E402
from report import machine, write_report  # noqa: E402  benchmarks/report.py

GiB, MiB = 2**30, 2**20
MODEL = ModelConfig(
    vocab_size=256, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=8, ffn_hidden_size=688,
    remat="full", attention="xla", max_positions=1 << 16,
)


def meshes(strategies: list[str]) -> list[tuple[str, dict, ModelConfig]]:
    """(label, mesh sizes, model) per case; the model's sequence parallelism is "auto" (on at tensor > 1)."""
    out = [("tensor 8 + SP", {"tensor": 8}, MODEL)]
    for sizes in ({"context": 4, "tensor": 2}, {"context": 8}):
        for strategy in strategies:
            label = " x ".join(f"{axis} {n}" for axis, n in sizes.items()) + f" {strategy}"
            out.append((label, sizes, dataclasses.replace(MODEL, context_parallel=strategy)))
    return out + [("one device", {}, MODEL)]


def loss_and_grads(model_config: ModelConfig, sizes: dict, seq: int):
    """The jitted loss + gradients of the model on ``sizes``, built abstractly, and its arguments' shapes."""
    devices = int(np.prod(list(sizes.values()))) if sizes else 1
    mesh = make_mesh(devices=jax.devices()[:devices], **sizes)
    model_config = model_config.with_sequence_parallel(mesh.shape, seq)[0]  # "auto", as a training run resolves it
    model = nnx.eval_shape(lambda: Transformer(model_config, mesh=mesh, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def loss(state, tokens):
        return nnx.merge(graphdef, state).loss(tokens, tokens)[0]

    return jax.jit(jax.value_and_grad(loss)), state, tokens, model


def temp_bytes(model_config: ModelConfig, sizes: dict, seq: int) -> int:
    fn, state, tokens, _ = loss_and_grads(model_config, sizes, seq)
    return fn.lower(state, tokens).compile().memory_analysis().temp_size_in_bytes


def step_seconds(model_config: ModelConfig, sizes: dict, seq: int, repeats: int) -> float:
    """Median wall time of the loss + gradients on real (random) weights and tokens."""
    devices = int(np.prod(list(sizes.values())))
    mesh = make_mesh(devices=jax.devices()[:devices], **sizes)
    model = Transformer(model_config.with_sequence_parallel(mesh.shape, seq)[0], mesh=mesh, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    fn = jax.jit(jax.value_and_grad(lambda state, tokens: nnx.merge(graphdef, state).loss(tokens, tokens)[0]))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, seq)), jnp.int32)
    jax.block_until_ready(fn(state, tokens))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(state, tokens))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--strategies", nargs="+", default=list(CONTEXT_STRATEGIES), choices=CONTEXT_STRATEGIES)
    parser.add_argument("--budget-gib", type=float, default=2.0)
    parser.add_argument("--time-seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if len(jax.devices()) < 8:
        print(f"context_parallel.py: needs 8 devices, found {len(jax.devices())}.", file=sys.stderr)
        return 2

    cases = meshes(args.strategies)
    memory = {}
    for label, sizes, config in cases:
        for seq in args.seqs:
            memory[label, seq] = temp_bytes(config, sizes, seq)
            print(f"{label:28s} S {seq:6d}: {memory[label, seq] / MiB:10.1f} MiB", flush=True)
    budget = args.budget_gib * GiB
    lines = [
        f"# Context parallelism: per-device temporaries of the compiled step (jax {jax.__version__})",
        "",
        f"Machine: {machine()}. Model: 4 layers, hidden 256, 8 heads of 32, SwiGLU 688, vocabulary 256, batch 1, "
        "float32, remat full, attention kernel xla; loss + gradients compiled, never run; "
        "`memory_analysis().temp_size_in_bytes` per device, MiB.",
        "",
        "| mesh | " + " | ".join(f"S {s}" for s in args.seqs) + f" | longest S within {args.budget_gib:g} GiB |",
        "|---|" + "---|" * (len(args.seqs) + 1),
    ]
    longest = {}
    for label, _, _ in cases:
        fits = [s for s in args.seqs if memory[label, s] <= budget]
        longest[label] = max(fits) if fits else None
        cells = " | ".join(f"{memory[label, s] / MiB:,.1f}" for s in args.seqs)
        lines.append(f"| {label} | {cells} | {longest[label] or '< ' + str(min(args.seqs))} |")
    lines += ["", "One device's temporaries over each mesh's (8 devices: 1/(n t) would be 8.00):", "",
              "| mesh | " + " | ".join(f"S {s}" for s in args.seqs) + " |", "|---|" + "---|" * len(args.seqs)]
    for label, _, _ in cases[:-1]:
        lines.append(f"| {label} | " + " | ".join(f"{memory['one device', s] / memory[label, s]:.2f}" for s in args.seqs) + " |")
    baseline = longest["tensor 8 + SP"]
    best = max((v for k, v in longest.items() if k not in ("tensor 8 + SP", "one device") and v), default=None)
    lines += ["", f"Longest S within {args.budget_gib:g} GiB: tensor 8 alone {baseline}, best with context {best}"
              + (f" ({best / baseline:.1f}x)." if best and baseline else ".")]

    timed = [(label, sizes, config) for label, sizes, config in cases
             if label == "tensor 8 + SP" or label.startswith("context 4 x tensor 2")]
    seconds = {label: step_seconds(config, sizes, args.time_seq, args.repeats) for label, sizes, config in timed}
    lines += ["", f"Step time (loss + gradients, run) at S {args.time_seq}, median of {args.repeats}, "
              "against tensor 8 + SP, one process:", "", "| mesh | seconds | ratio to tensor 8 |", "|---|---|---|"]
    for label, value in seconds.items():
        lines.append(f"| {label} | {value:.3f} | {value / seconds['tensor 8 + SP']:.2f} |")
    print("\n".join(lines))
    if args.out:
        write_report(lines, str(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
