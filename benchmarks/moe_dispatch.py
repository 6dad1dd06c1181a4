"""MoE dispatch: grouped (sort + ragged_dot) against GShard's one-hot einsums.

    python benchmarks/moe_dispatch.py [--seq 4096 --hidden 1024 --ffn 512 --experts 64 --top-k 8]
        [--time-experts 8,64] [--rounds 10] [--out FILE.md]

1. FLOPs of one MoE layer's forward on one device (one sequence of ``--seq``
   tokens, dropless), from ``compiled.cost_analysis()``, beside the routed
   FLOPs ``6 k S H F + 2 S H E`` (the three expert matmuls on k S rows, and the
   router):
   - ``one_hot``: dispatch="one_hot" (C = S: every expert on S slots, plus the
     [S, E, C] dispatch and combine einsums);
   - ``grouped, XLA:CPU``: dispatch="grouped" as compiled here. JAX lowers
     ``ragged_dot`` for CPU to a dense dot over every group, masked
     (``jax/_src/lax/lax.py``, ``_ragged_dot_general_impl``), so this counts
     E x the expert matmuls; on GPU and TPU it lowers to ``chlo.ragged_dot``
     (grouped GEMM), whose cost XLA's cost analysis does not count;
   - ``grouped, ragged_dot at its rows``: the same program with each
     ``ragged_dot(x [m, H], w [G, H, F], sizes)`` counted as one dense
     ``[m, H] @ [H, F]`` (what a grouped GEMM computes); everything else
     (router, sort, gathers, combine) is the compiled program's.
2. Step time (forward + backward), grouped / one-hot, dropless, at each
   ``--time-experts`` on 8 fake CPU devices (expert 8), in one process:
   interleaved rounds, median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
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
from lite_tp_jax.layers.moe import MoEMLP  # noqa: E402
from report import write_report  # noqa: E402  benchmarks/report.py


@contextlib.contextmanager
def ragged_dot_at_its_rows():
    """``jax.lax.ragged_dot`` replaced by a dense dot of the same rows against one
    group's weights: the FLOPs of a grouped GEMM over ``m`` rows."""
    original = jax.lax.ragged_dot
    jax.lax.ragged_dot = lambda lhs, rhs, group_sizes, **_: lhs @ rhs[0]
    try:
        yield
    finally:
        jax.lax.ragged_dot = original


def forward_flops(dispatch: str, seq: int, hidden: int, ffn: int, experts: int, top_k: int) -> float:
    mesh = make_mesh(devices=jax.devices()[:1])
    layer = nnx.eval_shape(lambda: MoEMLP(hidden, ffn, num_experts=experts, top_k=top_k, capacity_factor=None,
                                          dispatch=dispatch, mesh=mesh, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(layer)
    x = jax.ShapeDtypeStruct((1, seq, hidden), jnp.float32)
    compiled = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0]).lower(state, x).compile()
    return float(compiled.cost_analysis()["flops"])


def step_times(experts: int, top_k: int, rounds: int, *, batch=8, seq=256, hidden=256, ffn=512) -> dict:
    mesh = make_mesh(expert=8, devices=jax.devices()[:8])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, seq, hidden)), jnp.float32)
    steps = {}
    for dispatch in ("grouped", "one_hot"):
        layer = MoEMLP(hidden, ffn, num_experts=experts, top_k=top_k, capacity_factor=None, dispatch=dispatch,
                       mesh=mesh, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(layer)

        def loss(state, x, graphdef=graphdef):
            y, stats = nnx.merge(graphdef, state)(x)
            return jnp.sum(y * y) + 0.01 * stats["aux_loss"]

        step = jax.jit(jax.value_and_grad(loss))
        jax.block_until_ready(step(state, x))  # compile
        jax.block_until_ready(step(state, x))  # warm up
        steps[dispatch] = (step, state)
    times = {name: [] for name in steps}
    order = list(steps)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            step, state = steps[name]
            start = time.perf_counter()
            jax.block_until_ready(step(state, x))
            times[name].append(time.perf_counter() - start)
    ratios = sorted(g / o for g, o in zip(times["grouped"], times["one_hot"]))
    return {
        "grouped_ms": 1e3 * statistics.median(times["grouped"]),
        "one_hot_ms": 1e3 * statistics.median(times["one_hot"]),
        "ratio": statistics.median(ratios),
        "iqr": (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--time-experts", default="8,64")
    parser.add_argument("--time-top-k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    S, H, F, E, k = args.seq, args.hidden, args.ffn, args.experts, args.top_k

    routed = 6.0 * k * S * H * F + 2.0 * S * H * E
    one_hot = forward_flops("one_hot", S, H, F, E, k)
    grouped_cpu = forward_flops("grouped", S, H, F, E, k)
    with ragged_dot_at_its_rows():
        grouped = forward_flops("grouped", S, H, F, E, k)
    lines = [
        f"# MoE dispatch: grouped vs one-hot ({jax.devices()[0].platform}, JAX {jax.__version__})",
        "",
        f"## FLOPs of one MoE layer's forward, one device: S={S}, H={H}, F={F}, E={E}, k={k}, dropless",
        "",
        "| dispatch | GFLOP (cost_analysis) | / routed |",
        "|---|---:|---:|",
        f"| routed (6kSHF + 2SHE) | {routed / 1e9:,.1f} | 1.00 |",
        f"| grouped, ragged_dot at its rows | {grouped / 1e9:,.1f} | {grouped / routed:.3f} |",
        f"| grouped, XLA:CPU (ragged_dot dense over groups) | {grouped_cpu / 1e9:,.1f} | {grouped_cpu / routed:.2f} |",
        f"| one_hot (C = S) | {one_hot / 1e9:,.1f} | {one_hot / routed:.2f} |",
        "",
        f"## Step time (forward + backward), 8 fake devices (expert 8), dropless, top-{args.time_top_k}, "
        "B=8, S=256, H=256, F=512",
        "",
        "| E | grouped ms | one_hot ms | grouped / one_hot (median, IQR) |",
        "|---:|---:|---:|---|",
    ]
    print("\n".join(lines), flush=True)
    for experts in [int(e) for e in args.time_experts.split(",")]:
        r = step_times(experts, args.time_top_k, args.rounds)
        row = (f"| {experts} | {r['grouped_ms']:.1f} | {r['one_hot_ms']:.1f} | "
               f"{r['ratio']:.2f} ({r['iqr'][0]:.2f}-{r['iqr'][1]:.2f}) |")
        print(row, flush=True)
        lines.append(row)
    if args.out:
        write_report(lines, args.out)


if __name__ == "__main__":
    main()
