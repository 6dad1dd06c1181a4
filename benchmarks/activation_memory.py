"""Activation memory per layer, measured from the compiler, against Korthikanti et al.'s formulas.

    python benchmarks/activation_memory.py [--hidden 256] [--heads 16] [--kv-heads 4] [--ffn 688]
        [--seq 512] [--batch 4] [--out FILE.md]

For TP 1, 2, 4 x remat none / selective / full x sequence parallelism off / on,
the forward + backward of the model's loss is compiled (never run) at two
depths; the per-layer activation bytes are the slope of
``compiled.memory_analysis().temp_size_in_bytes`` between them, so embedding,
head, loss and parameters cancel out. Per device, float32 (p = 4 bytes).

The formulas (Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", per layer, bytes at 2-byte activations and 1-byte
dropout masks):

    no SP:             sbh (10 + 24/t + 5as/(ht))
    SP:                sbh (34/t + 5as/(ht))
    SP + selective:    sbh 34/t

adapted to this model (SwiGLU of width f, GQA with k kv heads of size d, no
dropout, p bytes per element) term by term:

    paper (bytes)                                 here (elements)
    10 sbh: norm inputs 2x2, QKV input 2,         4 sbh: norm inputs 2, QKV input 1,
            MLP input 2, two dropout masks 1+1           MLP input 1 (no dropout)
    24 sbh/t: Q, K 4, V 2, out-proj input 2,      (2h + 2kd + 3f) sb/t: q h, k and v kd each,
            GeLU input 8, GeLU output 8                  out-proj input h, gate f, up f, silu(gate)*up f
    5 as^2b/t: softmax 2, dropout mask 1,         as^2b/t: the softmax output
            dropout output 2

    none:       p sb (4h/t_sp + (2h + 2kd + 3f)/t + as/t)
    selective:  p sb (4h/t_sp + (2h + 2kd + 3f)/t)
    full:       p sb 2h/t_sp      (layer input and the residual after attention)

with t_sp = t under sequence parallelism, else 1 (the saved norm outputs are
the sequence shards; the backward all-gathers them again, as Megatron does).
The attention kernel is ``reference`` (the fused kernels never keep the
softmax; with them ``none`` measures like ``selective``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from lite_tp_jax.core.mesh import make_mesh  # noqa: E402
from report import machine, write_report  # noqa: E402  benchmarks/report.py
from lite_tp_jax.models.config import ModelConfig  # noqa: E402
from lite_tp_jax.models.transformer import Transformer  # noqa: E402

MiB = 2**20


def temp_bytes(config: ModelConfig, tensor: int, batch: int, seq: int) -> int:
    """Temp bytes per device of the compiled loss + gradients (built abstractly, compiled, not run)."""
    mesh = make_mesh(tensor=tensor, devices=jax.devices()[:tensor])
    model = nnx.eval_shape(lambda: Transformer(config, mesh=mesh, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def loss(state, tokens):
        return nnx.merge(graphdef, state).loss(tokens, tokens)[0]

    compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def formula(config: ModelConfig, tensor: int, batch: int, seq: int, bytes_per_element: int = 4) -> float:
    """The adapted Korthikanti bytes per layer and device (module docstring)."""
    h, f, a = config.hidden_size, config.ffn_hidden_size, config.num_heads
    kd = config.num_kv_heads * config.resolved_head_dim
    t, t_sp = tensor, (tensor if config.sequence_parallel else 1)
    sb = seq * batch
    if config.remat == "full":
        return bytes_per_element * sb * 2 * h / t_sp
    elements = 4 * h / t_sp + (2 * h + 2 * kd + 3 * f) / t
    if config.remat == "none":
        elements += a * seq / t
    return bytes_per_element * sb * elements


def paper(config: ModelConfig, tensor: int, batch: int, seq: int) -> float:
    """The paper's own bytes per layer (bf16, GeLU MLP of 4h, MHA, dropout), for reference."""
    s, b, h, a, t = seq, batch, config.hidden_size, config.num_heads, tensor
    softmax = 0 if config.remat == "selective" else 5 * a * s / (h * t)
    if config.remat == "full":
        return 2 * s * b * h / (t if config.sequence_parallel else 1)
    return s * b * h * ((34 / t if config.sequence_parallel else 10 + 24 / t) + softmax)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=688)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--depths", type=int, nargs=2, default=(4, 8))
    parser.add_argument("--tensor", type=int, nargs="+", default=(1, 2, 4))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if len(jax.devices()) < max(args.tensor):
        print(f"activation_memory.py: needs {max(args.tensor)} devices, found {len(jax.devices())}.", file=sys.stderr)
        return 2

    base = ModelConfig(
        vocab_size=256, hidden_size=args.hidden, num_heads=args.heads, num_kv_heads=args.kv_heads,
        ffn_hidden_size=args.ffn, attention="reference",
    )
    low, high = args.depths
    lines = [
        f"# Activation memory per layer (hidden {args.hidden}, {args.heads} heads, {args.kv_heads} kv heads, "
        f"SwiGLU {args.ffn}, seq {args.seq}, batch {args.batch}; float32; jax {jax.__version__})",
        "",
        f"Machine: {machine()}.",
        "",
        f"Slope of the compiled loss+grad temp bytes between {low} and {high} layers, per layer and device; "
        "formula: the adapted Korthikanti bytes (benchmarks/activation_memory.py docstring); "
        "paper: the unadapted formula (bf16, GeLU 4h, dropout) for comparison.",
        "",
        "| TP | SP | remat | measured MiB | formula MiB | measured / formula | paper MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    measured = {}
    for tensor in args.tensor:
        for sp in (False, True):
            for remat in ("none", "selective", "full"):
                config = dataclasses.replace(base, sequence_parallel=sp, remat=remat)
                per_depth = [
                    temp_bytes(dataclasses.replace(config, num_layers=depth), tensor, args.batch, args.seq)
                    for depth in (low, high)
                ]
                slope = (per_depth[1] - per_depth[0]) / (high - low)
                expected = formula(config, tensor, args.batch, args.seq)
                measured[tensor, sp, remat] = slope
                row = (
                    f"| {tensor} | {'on' if sp else 'off'} | {remat} | {slope / MiB:.2f} | {expected / MiB:.2f} "
                    f"| {slope / expected:.3f} | {paper(config, tensor, args.batch, args.seq) / MiB:.2f} |"
                )
                lines.append(row)
                print(row, flush=True)
    top = max(args.tensor)
    ratio = measured[top, False, "none"] / measured[top, True, "selective"]
    tp_only, sp_selective = (
        formula(dataclasses.replace(base, sequence_parallel=sp, remat=remat), top, args.batch, args.seq)
        for sp, remat in ((False, "none"), (True, "selective"))
    )
    lines += [
        "",
        f"At TP {top}: TP only without remat / SP + selective = **{ratio:.2f}x** per layer "
        f"(formula: {tp_only / sp_selective:.2f}x). Without dropout the softmax term is 1 element "
        "per score where the paper counts 2.5 (softmax, mask, dropout output in 2-byte units), "
        "so the same shapes gain less than the paper's ratio; the gap grows with a*s/h.",
    ]
    print("\n".join(lines))
    if args.out:
        write_report(lines, str(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
