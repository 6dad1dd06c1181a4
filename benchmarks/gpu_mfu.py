"""Model FLOPs utilisation of a ~1B Llama-style model on one GPU (bf16, cudnn attention).

    python benchmarks/gpu_mfu.py [--batch 8] [--seq 2048] [--steps 10] [--remat selective]
        [--peak-tflops 989] [--out FILE.md]

Trains ``CONFIG`` (hidden 2048, 16 layers, 32 heads / 8 kv heads, SwiGLU 8192,
vocab 32000: 1.1B parameters) on random tokens with ``TrainStep`` (AdamW,
float32 master weights and moments, ``compute_dtype: bfloat16``,
``attention: cudnn``) and reports

    model FLOPs per step = 6 N T + 12 L h s T     (PaLM, appendix B)

with N the parameters that do matmuls (all but the input embedding table), T
the tokens per step, L layers, h hidden, s sequence (the attention term counts
the full s x s scores, as PaLM and Megatron do, although causal attention
computes half of them); MFU = that / step time / the GPU's dense bf16 peak.

It needs a GPU: on a machine without one it exits 2 with one sentence saying
so. Nothing else depends on it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from report import write_report  # noqa: E402  benchmarks/report.py

# Dense bf16 tensor-core peak, TFLOP/s, by jax device_kind substring.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--remat", choices=("none", "selective", "full"), default="selective")
    parser.add_argument("--attention", choices=("auto", "xla", "cudnn", "reference"), default="cudnn")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU (default: by device kind)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    if jax.default_backend() != "gpu":
        print(
            f"gpu_mfu.py needs a GPU, but JAX's backend here is {jax.default_backend()!r}; "
            "run it on a machine with a CUDA GPU and jax[cuda] installed.",
            file=sys.stderr,
        )
        return 2
    device = jax.devices()[0]
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device.device_kind), None)
    if peak is None:
        print(f"gpu_mfu.py does not know the bf16 peak of {device.device_kind!r}; pass --peak-tflops.", file=sys.stderr)
        return 2

    import numpy as np
    from flax import nnx

    from lite_tp_jax.core.mesh import make_mesh
    from lite_tp_jax.models.config import ModelConfig
    from lite_tp_jax.run.config import TrainConfig
    from lite_tp_jax.run.optimizer import create_model_and_optimizer
    from lite_tp_jax.sharding.rules import batch_sharding
    from lite_tp_jax.train.decoder_step import decoder_step

    config = ModelConfig(
        vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        ffn_hidden_size=8192, compute_dtype="bfloat16", attention=args.attention, remat=args.remat,
    )
    train = TrainConfig(steps=args.steps + 2, global_batch=args.batch, seq_len=args.seq, warmup_steps=1)
    mesh = make_mesh(devices=[device])
    model, optimizer = create_model_and_optimizer(config, train, mesh)
    params = sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    matmul_params = params - config.vocab_size * config.hidden_size  # the input table is a lookup
    tokens_per_step = args.batch * args.seq
    flops = 6 * matmul_params * tokens_per_step + 12 * config.num_layers * config.hidden_size * args.seq * tokens_per_step

    step = decoder_step(model, optimizer, train)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, config.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    inputs, targets = (jax.device_put(a, batch_sharding(mesh)) for a in (batch[:, :-1], batch[:, 1:]))
    for _ in range(2):  # compile, warm up
        jax.block_until_ready(step((inputs, targets)))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        metrics = jax.block_until_ready(step((inputs, targets)))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    achieved = flops / seconds / 1e12
    lines = [
        f"# MFU on one {device.device_kind} (jax {jax.__version__})",
        "",
        f"Model: {params / 1e9:.2f}B parameters (hidden 2048, 16 layers, 32/8 heads, SwiGLU 8192, vocab 32000), "
        f"bf16 compute, attention {args.attention}, remat {args.remat}; batch {args.batch} x seq {args.seq}; "
        f"median of {args.steps} steps (loss {float(metrics['loss']):.3f}).",
        "",
        "| step (ms) | tokens/s | model TFLOP/s | peak TFLOP/s | MFU |",
        "|---|---|---|---|---|",
        f"| {seconds * 1e3:.1f} | {tokens_per_step / seconds:,.0f} | {achieved:.1f} | {peak:.0f} | {achieved / peak:.1%} |",
    ]
    print("\n".join(lines))
    if args.out:
        write_report(lines, str(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
