"""lite_tp_jax's explicit tensor parallelism against XLA's automatic partitioner
(GSPMD) and against one device: same math, same weights, one process.

    python benchmarks/tp_vs_gspmd.py [--tensor 4] [--data 2] [--repeats 20] [--out FILE.md]

Workloads: a SwiGLU ``ParallelMLP`` forward+backward, and a full ``TrainStep``
(forward, backward, AdamW) of a small ``Transformer``. Variants of each:

    ours     lite_tp_jax: shard_map over "tensor" with explicit collectives
    GSPMD    the same math in plain jax.numpy under jax.jit; weights placed with
             the same PartitionSpecs, batch over "data"; XLA inserts collectives
    1 device the plain jax.numpy version, unsharded, on one device

Each is compiled once and warmed up; then the variants run interleaved
(A B C A B C ...) ``--repeats`` times. Ratios are medians of per-round ratios.
Collectives and memory are read from the compiled executables. Without an
accelerator, 8 fake CPU devices are used (they share the host's cores, so the
times measure overhead, not speed-up). See benchmarks/README.md.
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
from collections import Counter

import flax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from lite_tp_jax import DATA, ParallelMLP, export_state, make_mesh
from lite_tp_jax.state import flat_variables, logical_sharding
from lite_tp_jax.hlo import collectives_per_step
from report import machine, write_report  # benchmarks/report.py
from lite_tp_jax.layers.rotary import apply_rotary
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.train.config import TrainConfig
from lite_tp_jax.train.step import TrainStep, create_model_and_optimizer, learning_rate_schedule, make_optimizer

MODEL = ModelConfig(vocab_size=256, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, ffn_hidden_size=688)
BATCH, SEQ = 8, 128
VARIANTS = ("ours", "GSPMD", "1 device")


# --- the plain jax.numpy math (GSPMD and one-device variants) ----------------


def swiglu(x, w):
    return (jax.nn.silu(x @ w["gate"]["kernel"]) * (x @ w["up"]["kernel"])) @ w["down"]["kernel"]


def rms_norm(x, scale, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def attention(x, w, cfg: ModelConfig):
    q, k, v = (jnp.einsum("bsf,fhd->bshd", x, w[name]["kernel"]) for name in ("query", "key", "value"))
    positions = jnp.arange(x.shape[1])
    q, k = apply_rotary(q, positions, cfg.rope_theta), apply_rotary(k, positions, cfg.rope_theta)
    group = cfg.num_heads // cfg.num_kv_heads
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(cfg.resolved_head_dim))
    causal = jnp.tril(jnp.ones((x.shape[1],) * 2, dtype=bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bqhd,hdf->bqf", jnp.einsum("bhqk,bkhd->bqhd", weights, v), w["out"]["kernel"])


def transformer_loss(p, tokens, targets, cfg: ModelConfig):
    def block(x, b):
        x = x + attention(rms_norm(x, b["attention_norm"]["scale"], cfg.norm_eps), b["attention"], cfg)
        return x + swiglu(rms_norm(x, b["mlp_norm"]["scale"], cfg.norm_eps), b["mlp"]), None

    x, _ = jax.lax.scan(block, p["embed"]["embedding"][tokens], p["layers"]["blocks"]["0"])
    logits = rms_norm(x, p["final_norm"]["scale"], cfg.norm_eps) @ p["head"]["embedding"].T
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target_logits)


def jnp_train_step(cfg: ModelConfig, train: TrainConfig, state, batch_sharding):
    """AdamW step of the plain model; ``state = (params, opt_state, step)`` keeps its placement."""
    tx, schedule = optax.chain(optax.clip_by_global_norm(train.grad_clip), make_optimizer(train)), learning_rate_schedule(train)

    def step(state, tokens, targets):
        params, opt_state, count = state
        loss, grads = jax.value_and_grad(transformer_loss)(params, tokens, targets, cfg)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(count)}
        return (optax.apply_updates(params, updates), opt_state, count + 1), metrics

    shardings = jax.tree.map(lambda a: a.sharding, state)
    return jax.jit(step, in_shardings=(shardings, batch_sharding, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=0)


# --- weights: names, nesting, placement ---------------------------------------


def nested(flat: dict) -> dict:
    """``{"a.b": v}`` -> ``{"a": {"b": v}}`` (nested, so optax's decay mask sees "kernel")."""
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def param_shardings(module, mesh) -> dict:
    """Each logical parameter's NamedSharding from the PartitionSpec lite_tp_jax gave it."""
    return nested({name: logical_sharding(v, mesh) for name, v in flat_variables(module).items()})


def max_rel_err(a, b) -> float:
    """Max over leaves of max|a - b| / max|b|."""
    def one(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))
    return max(jax.tree.leaves(jax.tree.map(one, a, b)))


# --- workloads: each returns {variant: (compiled, run)} and its equal-work check


def mlp_workload(mesh, data_sharding, one_device):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, SEQ, MODEL.hidden_size)).astype(np.float32)
    c = rng.standard_normal(x.shape).astype(np.float32)  # cotangent of the output
    layer = ParallelMLP(MODEL.hidden_size, MODEL.ffn_hidden_size, mesh=mesh, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    weights = nested(export_state(layer))

    def ours_loss(state, x, c):
        return jnp.sum(c * nnx.merge(graphdef, state)(x))

    def jnp_loss(w, x, c):
        return jnp.sum(c * swiglu(x, w))

    xs, cs = jax.device_put((x, c), data_sharding)
    args = {
        "ours": (state, xs, cs),
        "GSPMD": (jax.device_put(weights, param_shardings(layer, mesh)), xs, cs),
        "1 device": jax.device_put((weights, x, c), one_device),
    }
    fns = {"ours": ours_loss, "GSPMD": jnp_loss, "1 device": jnp_loss}
    variants, results = {}, {}
    for name in VARIANTS:
        compiled = jax.jit(jax.value_and_grad(fns[name], argnums=(0, 1))).lower(*args[name]).compile()
        variants[name] = (compiled, lambda compiled=compiled, a=args[name]: compiled(*a))
        (loss, (dw, dx)) = compiled(*args[name])
        results[name] = (loss, nested(export_state(dw)) if name == "ours" else dw, dx)
    return variants, f"loss, weight and input gradients: {max_rel_err(results['ours'], results['GSPMD']):.1e}"


def transformer_workload(mesh, data_sharding, one_device, check_steps=3):
    train = TrainConfig(global_batch=BATCH, seq_len=SEQ)
    model, optimizer = create_model_and_optimizer(MODEL, train, mesh)
    tokens = np.random.default_rng(1).integers(0, MODEL.vocab_size, (BATCH, SEQ + 1), dtype=np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def jnp_state(sharding, replicated):
        tx = optax.chain(optax.clip_by_global_norm(train.grad_clip), make_optimizer(train))
        params = jax.device_put(nested(export_state(model)), sharding)
        opt_state = tx.init(params)  # moments sharded like their parameter, counters replicated:
        opt_state = jax.device_put(opt_state, optax.tree_map_params(
            tx, lambda _, s: s, opt_state, sharding, transform_non_params=lambda _: replicated))
        return params, opt_state, jax.device_put(np.int32(0), replicated)

    one_device_tree = jax.tree.map(lambda _: one_device, param_shardings(model, mesh))
    states = {"GSPMD": jnp_state(param_shardings(model, mesh), NamedSharding(mesh, P())),
              "1 device": jnp_state(one_device_tree, one_device)}
    batches = {"ours": jax.device_put((inputs, targets), data_sharding),
               "GSPMD": jax.device_put((inputs, targets), data_sharding),
               "1 device": jax.device_put((inputs, targets), one_device)}
    ours = TrainStep(model, optimizer, train)
    steps = {"ours": ours,
             "GSPMD": jnp_train_step(MODEL, train, states["GSPMD"], data_sharding),
             "1 device": jnp_train_step(MODEL, train, states["1 device"], one_device)}
    # For HLO and memory; TrainStep.__call__ compiles the same program for itself.
    compiled = {"ours": ours.lower(*batches["ours"]).compile()}
    for name in ("GSPMD", "1 device"):
        compiled[name] = steps[name].lower(states[name], *batches[name]).compile()

    def run(name):
        if name == "ours":
            metrics = ours(*batches[name])
            return {k: metrics[k] for k in ("loss", "grad_norm", "lr")}, nnx.state((model, optimizer))
        states[name], metrics = steps[name](states[name], *batches[name])
        return metrics, states[name]

    # Equal work: a few steps from the same weights give the same losses, norms and weights.
    history = {name: [jax.device_get(run(name)[0]) for _ in range(check_steps)] for name in ("ours", "GSPMD")}
    error = (f"loss, grad norm and lr of {check_steps} steps: {max_rel_err(history['ours'], history['GSPMD']):.1e}; "
             f"weights after them: {max_rel_err(nested(export_state(model)), states['GSPMD'][0]):.1e}")
    return {name: (compiled[name], lambda name=name: run(name)) for name in VARIANTS}, error


# --- measuring and reporting --------------------------------------------------


def interleaved_times(runs: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    for _ in range(warmup):
        for run in runs.values():
            jax.block_until_ready(run())
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    return times


def ratio(a: list[float], b: list[float]) -> str:
    """Median of the per-round ratios a/b, with their interquartile range."""
    if a is b:
        return "1"
    q1, median, q3 = statistics.quantiles([x / y for x, y in zip(a, b)], n=4)
    return f"{median:.2f} ({q1:.2f}–{q3:.2f})"


def executed_collectives(hlo_text: str) -> list:
    """Each collective as often as one step runs it (the layer scan's once per layer)."""
    return [c for c, runs in collectives_per_step(hlo_text) for _ in range(runs)]


def comm_summary(found: list) -> tuple[str, int]:
    kinds: dict[str, list[int]] = {}
    for c in found:
        kinds.setdefault(c.kind, []).append(c.bytes)
    text = ", ".join(f"{kind} ×{len(b)} ({mib(sum(b))})" for kind, b in sorted(kinds.items()))
    return text or "none", sum(sum(b) for b in kinds.values())


def comm_difference(ours: list, gspmd: list) -> list[str]:
    """The collectives (kind, dtype, shape) that one variant runs more often than the other."""
    a, b = (Counter((c.kind, c.dtype, c.shape) for c in found) for found in (ours, gspmd))
    return [f"- {kind} {dtype}{list(shape)}: ours ×{a[key]}, GSPMD ×{b[key]}"
            for key in sorted(set(a) | set(b)) if a[key] != b[key] for kind, dtype, shape in [key]]


def mib(n: float) -> str:
    return f"{n / 2**20:.3f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def memory(compiled) -> str:
    m = compiled.memory_analysis()
    if m is None:
        return "n/a"
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return f"{total / 2**20:.1f} (temp {m.temp_size_in_bytes / 2**20:.1f})"


def report(title: str, variants: dict, times: dict, error: str, seconds: float) -> list[str]:
    found = {name: executed_collectives(compiled.as_text()) for name, (compiled, _) in variants.items()}
    lines = [f"### {title}", "", f"Max relative error ours vs GSPMD: {error}. "
             f"Compile, check and timing took {seconds:.0f} s.", "",
             "| variant | median step (ms) | / GSPMD | / 1 device | collectives run per device per step "
             "(count, result bytes) | total | memory per device (MiB) |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for name in VARIANTS:
        comm, total = comm_summary(found[name])
        lines.append(
            f"| {name} | {statistics.median(times[name]) * 1e3:.2f} | {ratio(times[name], times['GSPMD'])}"
            f" | {ratio(times[name], times['1 device'])} | {comm} | {mib(total)} | {memory(variants[name][0])} |"
        )
    diff = comm_difference(found["ours"], found["GSPMD"])
    return lines + ["", "Collectives that differ (per device per step, result shapes):", "", *(diff or ["- none"]), ""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensor", type=int, default=4)
    parser.add_argument("--data", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (at least 2)")
    parser.add_argument("--out", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2")
    split = (MODEL.ffn_hidden_size, MODEL.num_heads, MODEL.vocab_size)
    if any(n % args.tensor for n in split) or BATCH % args.data:
        # ours pads uneven shards; the GSPMD baseline places the logical weights and needs even ones.
        parser.error(f"--tensor must divide ffn, heads and vocab {split} and --data the batch {BATCH}")

    devices = jax.devices()[: args.tensor * args.data]
    mesh = make_mesh(data=args.data, tensor=args.tensor, devices=devices)
    data_sharding, one_device = NamedSharding(mesh, P(DATA)), SingleDeviceSharding(devices[0])
    lines = [
        "# lite_tp_jax (ours) vs GSPMD vs one device",
        "",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: {machine()}; mesh data={args.data} x tensor={args.tensor}",
        f"- jax {jax.__version__}, flax {flax.__version__}, "
        f"optax {optax.__version__}, python {platform.python_version()}",
        f"- command: `{' '.join([os.path.relpath(sys.executable), *sys.argv])}`",
        f"- {args.repeats} interleaved rounds after 2 warm-up rounds; ratios: median of the per-round "
        "ratios (interquartile range); memory: argument + output + temp - aliased (donated) bytes",
        "",
    ]
    print("\n".join(lines), flush=True)
    workloads = (
        (f"ParallelMLP forward+backward (SwiGLU, batch {BATCH} x seq {SEQ}, hidden {MODEL.hidden_size}, "
         f"ffn {MODEL.ffn_hidden_size})", mlp_workload),
        (f"Transformer TrainStep (AdamW; hidden {MODEL.hidden_size}, {MODEL.num_layers} layers, "
         f"{MODEL.num_heads} heads / {MODEL.num_kv_heads} kv, ffn {MODEL.ffn_hidden_size}, vocab "
         f"{MODEL.vocab_size}, batch {BATCH} x seq {SEQ})", transformer_workload),
    )
    for title, workload in workloads:
        start = time.perf_counter()
        variants, error = workload(mesh, data_sharding, one_device)
        times = interleaved_times({name: run for name, (_, run) in variants.items()}, args.repeats)
        section = report(title, variants, times, error, time.perf_counter() - start)
        print("\n".join(section), flush=True)
        lines += section
    if args.out:
        write_report(lines, args.out)


if __name__ == "__main__":
    main()
