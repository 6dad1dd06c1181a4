"""Compile time of a user's model against its depth: blocks stacked and scanned
(``tp.stack_blocks`` / ``tp.scan_blocks``) next to the same blocks unrolled.

    python benchmarks/user_model_compile.py [--data 2] [--tensor 4] [--depths 2,8,48] [--unrolled 2,8] [--repeats 3] [--out FILE.md]

Workload: the training step (``tp.TrainStep``: forward, backward, SGD,
clipping) of a bidirectional encoder of our layers (LayerNorm, bidirectional
``ParallelAttention``, GeLU ``ParallelMLP``; 64 wide, 4 heads, ffn 172, vocab
256), batch 8 x 64 tokens, masked-token loss, at ``data x tensor``. For each
depth a fresh step is lowered and compiled (``.lower(batch).compile()``, the
persistent compilation cache off) ``--repeats`` times, the depths interleaved;
reported: the fastest of those seconds (the least disturbed by other load on
the host) and its ratio to the shallowest depth of the same variant. ``unrolled`` is the baseline: the blocks
held in an ``nnx.List`` and called one after the other inside the same region,
so XLA sees every block. Without an accelerator the devices are fake CPU
devices sharing the host's cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import jax
import numpy as np

from lite_tp_jax.runtime.devices import provide_cpu_devices
from report import machine, write_report  # benchmarks/report.py

DIM, HEADS, FFN, VOCAB, ROWS, SEQ = 64, 4, 172, 256, 8, 64


def build(depth: int, scanned: bool, mesh):
    import optax
    from flax import nnx

    import lite_tp_jax as tp

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.attention_norm = tp.LayerNorm(DIM, mesh=mesh, rngs=rngs)
            self.attention = tp.ParallelAttention(DIM, HEADS, causal=False, mesh=mesh, rngs=rngs)
            self.mlp_norm = tp.LayerNorm(DIM, mesh=mesh, rngs=rngs)
            self.mlp = tp.ParallelMLP(DIM, FFN, activation="gelu", mesh=mesh, rngs=rngs)

        def __call__(self, x):
            x = x + self.attention(self.attention_norm(x))
            return x + self.mlp(self.mlp_norm(x))

    class Encoder(nnx.Module):
        def __init__(self, rngs):
            self.mesh = mesh
            self.embed = tp.VocabParallelEmbedding(VOCAB, DIM, mesh=mesh, rngs=rngs)
            self.positions = tp.LearnedPositions(SEQ, DIM, mesh=mesh, rngs=rngs)
            self.blocks = (
                tp.stack_blocks(Block, depth, mesh=mesh, rngs=rngs) if scanned else nnx.List([Block(rngs) for _ in range(depth)])
            )
            self.norm = tp.LayerNorm(DIM, mesh=mesh, rngs=rngs)

        @tp.region()
        def loss(self, batch):
            x = self.positions(self.embed(batch["tokens"]))
            if scanned:
                x = tp.scan_blocks(self.blocks, x, remat="full")
            else:
                for block in self.blocks:
                    x = block(x)
            logits = self.embed.attend(self.norm(x))
            losses = tp.vocab_parallel_cross_entropy(logits, batch["targets"], VOCAB, vocab_axes=self.embed.vocab_axes)
            return tp.batch_sum(losses * batch["mask"]) / tp.batch_sum(batch["mask"]), {}

    model = Encoder(nnx.Rngs(0))
    return tp.TrainStep(model, tp.create_optimizer(model, optax.sgd(0.1)), lambda m, b: m.loss(b), grad_clip=1.0)


def compile_seconds(depth: int, scanned: bool, mesh, batch) -> float:
    step = build(depth, scanned, mesh)
    start = time.perf_counter()
    step.lower(batch).compile()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=int, default=2)
    parser.add_argument("--tensor", type=int, default=4)
    parser.add_argument("--depths", default="2,8,48")
    parser.add_argument("--unrolled", default="2,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    if os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        provide_cpu_devices(args.data * args.tensor)
    jax.config.update("jax_enable_compilation_cache", False)
    from lite_tp_jax import make_mesh

    mesh = make_mesh(data=args.data, tensor=args.tensor)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (ROWS, SEQ)).astype(np.int32)
    batch = {"tokens": tokens, "targets": tokens, "mask": (rng.random((ROWS, SEQ)) < 0.15).astype(np.float32)}
    lines = [
        "# Compile time of a user model against depth",
        "",
        f"`python benchmarks/user_model_compile.py --data {args.data} --tensor {args.tensor} --depths {args.depths} "
        f"--unrolled {args.unrolled} --repeats {args.repeats}`, {datetime.date.today()}; {machine()}; jax {jax.__version__}.",
        "",
        "| variant | blocks | compile (s) | ratio to the shallowest |",
        "|---|---|---|---|",
    ]
    for variant, depths in (("scanned", args.depths), ("unrolled", args.unrolled)):
        depths = [int(d) for d in depths.split(",") if d]
        runs = {d: [] for d in depths}
        for _ in range(args.repeats):
            for d in depths:
                runs[d].append(compile_seconds(d, variant == "scanned", mesh, batch))
        seconds = {d: min(runs[d]) for d in depths}
        for d in depths:
            lines.append(f"| {variant} | {d} | {seconds[d]:.2f} | {seconds[d] / seconds[depths[0]]:.2f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.out:
        write_report(lines, args.out)


if __name__ == "__main__":
    main()
