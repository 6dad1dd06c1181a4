"""The pipeline bubble, measured on a full TrainStep, next to the analytic
``(p - 1) / (v*m + p - 1)`` of ``lite_tp_jax.parallel.pipeline.bubble_fraction``.

    python benchmarks/pipeline_bubble.py [--pipeline 2] [--tensor 2] [--microbatches 1,2,4,8]
                                         [--virtual-stages 1,2] [--repeats 10] [--out FILE.md]
                                         [--default-malloc]

Workload: one ``TrainStep`` (forward, backward, AdamW) of a small Transformer
(configs/tiny.yaml with 8 layers, hidden 128, seq 64) on a mesh pipeline=p x
tensor=t, with the microbatch *size* fixed (2 rows): ``global_batch = 2*m``,
``microbatches = m``, for every m and every v (``virtual_stages``; v > 1 needs
m >= p, other pairs are skipped).

The SPMD schedule runs every stage at every tick and does ``v*m + p - 1`` ticks
of one microbatch through one chunk (``L / (p*v)`` layers), forward and
backward. So the step time should be ``T(m, v) = a*m + b`` with the slope ``a``
one microbatch through all layers (``v`` ticks) and the intercept ``b`` the
``p - 1`` bubble ticks (``(p - 1) * a / v``) plus fixed per-step work (the
optimizer update). Every configuration is compiled and warmed up, then all run
interleaved ``--repeats`` times; ``a`` and ``b`` are least-squares fits of the
median times against m, per v. Reported per (v, m): the median step time, the
measured bubble ``1 - m*a / T`` (= the intercept's share: includes the fixed
overhead, an upper estimate), the bubble ticks' share ``(p - 1) * (a/v) / T``
(tick cost from the slope: excludes the overhead from the bubble but not from
the step, a lower estimate), and the analytic fraction. Also the collective-
permutes per step read from the compiled HLO of one configuration, with and
without sequence parallelism. Without an accelerator, p*t fake CPU devices are
used (they share the host's cores), and glibc is told to keep freed memory
(``keep_freed_memory``; ``--default-malloc`` leaves it alone): otherwise,
once a device's step temporaries pass 32 MiB, every step page-faults them in
afresh and T(m) bends upwards; the table shows the page faults per step. See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import resource
import statistics
import sys
import time

import flax
import jax
import numpy as np
import optax

from lite_tp_jax.core.hlo import collectives_per_step
from report import machine, write_report  # benchmarks/report.py
from lite_tp_jax.core.mesh import make_mesh_for
from lite_tp_jax.runtime.devices import provide_cpu_devices
from lite_tp_jax.parallel.pipeline import bubble_fraction
from lite_tp_jax.run.config_file import load_config
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.sharding.rules import batch_sharding
from lite_tp_jax.train.decoder_step import decoder_step

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "tiny.yaml")
MICROBATCH_ROWS = 2
MODEL_OVERRIDES = ("model.num_layers=8", "model.hidden_size=128", "model.num_heads=4",
                   "model.num_kv_heads=2", "model.ffn_hidden_size=344", "train.seq_len=64")


def on_cpu() -> bool:
    return os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu")


def keep_freed_memory() -> bool:
    """glibc: serve blocks up to 1 GiB from one heap and keep freed memory.

    By default glibc hands out blocks above its mmap threshold (at most 32 MiB)
    as fresh mmaps and unmaps them on free, and a thread's own arena cannot
    hold a block above 64 MiB at all. XLA's CPU runtime allocates each step's
    temporaries anew, so past such a size every step page-faults its
    temporaries in again: a cost that switches on at some m and bends the
    line T(m). One arena (the main heap grows without that limit), a 1 GiB
    mmap threshold and no trimming avoid it. Must run before jax starts its
    threads. Returns False where mallopt is unavailable (not glibc)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    return all(mallopt(option, value) for option, value in
               ((m_arena_max, 1), (m_mmap_threshold, 1 << 30), (m_trim_threshold, 1 << 30)))


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


# --- one configuration: model, optimizer, compiled step, batch ---------------------


class Case:
    """A TrainStep for (m, v) on the shared mesh, with its fixed random batch."""

    def __init__(self, mesh, m: int, v: int, extra: tuple[str, ...] = ()):
        self.m, self.v = m, v
        overrides = (*MODEL_OVERRIDES, f"model.virtual_stages={v}", f"train.global_batch={MICROBATCH_ROWS * m}",
                     f"train.microbatches={m}", *extra)
        self.config = load_config(CONFIG, overrides)
        model, optimizer = create_model_and_optimizer(self.config.model, self.config.train, mesh)
        self.step = decoder_step(model, optimizer, self.config.train)
        seq, vocab = self.config.train.seq_len, self.config.model.vocab_size
        tokens = np.random.default_rng(m).integers(0, vocab, (MICROBATCH_ROWS * m, seq + 1), dtype=np.int32)
        self.batch = jax.device_put((tokens[:, :-1], tokens[:, 1:]), batch_sharding(mesh))

    def __call__(self):
        return self.step(self.batch)

    def hlo(self) -> str:
        return self.step.lower(self.batch).compile().as_text()


# --- collectives per step from the HLO (loop bodies times their trip counts) ---------

def permutes(hlo_text: str) -> tuple[list, list]:
    """The collective-permutes as written in the HLO (each with how often it
    runs per step) and as run per step."""
    written = [(c, n) for c, n in collectives_per_step(hlo_text) if c.kind == "collective-permute"]
    return written, [c for c, n in written for _ in range(n)]


def permute_lines(label: str, hlo_text: str) -> list[str]:
    written, run = permutes(hlo_text)
    shapes = ", ".join(f"{c.dtype}{list(c.shape)} ({c.bytes / 1024:g} KiB) in a loop run {n}×" for c, n in written)
    return [(f"- {label}: {len(written)} collective-permute(s) in the HLO text: {shapes or 'none'}; "
            f"run per step: {len(run)}, {sum(c.bytes for c in run) / 1024:g} KiB per device")]


# --- measuring ---------------------------------------------------------------------


def interleaved_times(cases: dict, repeats: int, warmup: int = 2) -> tuple[dict, dict]:
    """Step times (s) and the process's minor page faults during each step."""
    for _ in range(warmup):
        for case in cases.values():
            jax.block_until_ready(case())
    times, faults = {key: [] for key in cases}, {key: [] for key in cases}
    for _ in range(repeats):
        for key, case in cases.items():
            faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            jax.block_until_ready(case())
            times[key].append(time.perf_counter() - start)
            faults[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
    return times, faults


def fit(ms: list[int], ts: list[float]) -> tuple[float, float]:
    """Least squares T = a*m + b."""
    a, b = np.polyfit(np.asarray(ms, float), np.asarray(ts, float), 1)
    return float(a), float(b)


def spread(values: list[float], digits: int = 3) -> str:
    """Median (interquartile range)."""
    q1, mid, q3 = statistics.quantiles(values, n=4)
    return f"{mid:.{digits}f} ({q1:.{digits}f} to {q3:.{digits}f})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", type=int, default=2)
    parser.add_argument("--tensor", type=int, default=2)
    parser.add_argument("--microbatches", type=int_list, default=[1, 2, 4, 8], help="values of m, e.g. 1,2,4,8")
    parser.add_argument("--virtual-stages", type=int_list, default=[1, 2], help="values of v, e.g. 1,2")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (at least 2)")
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--default-malloc", action="store_true",
                        help="on CPU, keep glibc's mmap threshold (see keep_freed_memory)")
    args = parser.parse_args(argv)
    p, t = args.pipeline, args.tensor
    if args.repeats < 2:
        parser.error("--repeats must be at least 2")
    if p < 2:
        parser.error("--pipeline must be at least 2 (with one stage there is no bubble)")
    groups = 8  # model.num_layers, one dense layer per group
    for v in args.virtual_stages:
        if groups % (v * p):
            parser.error(f"--pipeline x each --virtual-stages must divide the {groups} layers, got {p} x {v}")
    malloc = "not applicable (accelerator)"
    if on_cpu():
        provide_cpu_devices(p * t)  # before the first jax operation
        malloc = "glibc defaults (--default-malloc)"
        if not args.default_malloc:
            malloc = ("one arena, mmap and trim thresholds 1 GiB (mallopt; see keep_freed_memory)" if keep_freed_memory()
                      else "glibc defaults (mallopt unavailable)")
    elif len(jax.devices()) < p * t:
        parser.error(f"--pipeline x --tensor = {p * t} exceeds the {len(jax.devices())} devices")

    pairs = [(v, m) for v in args.virtual_stages for m in args.microbatches if v == 1 or m >= p]
    skipped = [(v, m) for v in args.virtual_stages for m in args.microbatches if (v, m) not in pairs]
    for v in args.virtual_stages:
        if len([m for w, m in pairs if w == v]) < 2:
            parser.error(f"v={v} needs at least two microbatch counts m >= {p if v > 1 else 1} to fit a slope")
    mesh = make_mesh_for({"data": 1, "pipeline": p, "expert": 1, "tensor": t})

    command = " ".join([os.path.relpath(sys.executable), *sys.argv]) if argv is None else " ".join(argv)
    lines = [
        "# Pipeline bubble: measured vs (p - 1) / (v*m + p - 1)",
        "",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: {machine()}; mesh pipeline={p} x tensor={t}",
        (f"- jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
        f"python {platform.python_version()}"),
        f"- command: `{command}`",
        (f"- workload: TrainStep (forward, backward, AdamW) of `configs/tiny.yaml` with "
        f"{', '.join(f'`{o}`' for o in MODEL_OVERRIDES)}; microbatch {MICROBATCH_ROWS} rows, "
        f"so global_batch = {MICROBATCH_ROWS}·m"),
        (f"- {args.repeats} interleaved rounds after compile + 2 warm-up rounds; T: median step time; "
        "other columns: median (interquartile range) over the rounds"),
        f"- host memory allocator: {malloc}",
    ]
    if skipped:
        lines.append("- skipped (the circular schedule needs m >= p): "
                     + ", ".join(f"v={v} m={m}" for v, m in skipped))
    lines.append("")
    print("\n".join(lines), flush=True)

    start = time.perf_counter()
    cases = {}
    for v, m in pairs:
        cases[v, m] = Case(mesh, m, v)
        jax.block_until_ready(cases[v, m]())  # compiles
        print(f"compiled v={v} m={m} ({time.perf_counter() - start:.0f} s)", flush=True)
    compiled_at = time.perf_counter() - start
    times, faults = interleaved_times(cases, args.repeats)
    median = {key: statistics.median(ts) for key, ts in times.items()}
    timed_at = time.perf_counter() - start

    # Fits per round (the rounds are interleaved, so a slow spell of the machine
    # shifts one round's times together), then medians over the rounds.
    rounds = range(args.repeats)
    ms = {v: [m for w, m in pairs if w == v] for v in args.virtual_stages}
    per_round = {v: [fit(ms[v], [times[v, m][r] for m in ms[v]]) for r in rounds] for v in args.virtual_stages}
    fits = {v: (statistics.median(a for a, _ in rs), statistics.median(b for _, b in rs))
            for v, rs in per_round.items()}
    table = [
        f"Compiling took {compiled_at:.0f} s, warm-up and timing {timed_at - compiled_at:.0f} s.",
        "",
        ("| v | m | ticks v·m+p−1 | T (ms) | fit a·m+b (ms) | measured 1 − m·a/T (incl. overhead) "
        "| bubble ticks (p−1)·(a/v)/T | analytic (p−1)/(v·m+p−1) | page faults per step |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, m in pairs:
        a, b = fits[v]
        measured = [1 - m * per_round[v][r][0] / times[v, m][r] for r in rounds]
        ticks = [(p - 1) * per_round[v][r][0] / v / times[v, m][r] for r in rounds]
        table.append(
            f"| {v} | {m} | {v * m + p - 1} | {median[v, m] * 1e3:.1f} | {(a * m + b) * 1e3:.1f} "
            f"| {spread(measured)} | {spread(ticks)} | {bubble_fraction(p, m, v):.3f} "
            f"| {statistics.median(faults[v, m]):.0f} |"
        )
    table += [
        "",
        ("Fits per v (least squares of T over the measured m, per round; medians over the rounds). "
        "The schedule predicts an intercept of p−1 ticks, (p−1)·a/v; the rest of the intercept is fixed "
        "per-step work (optimizer update, embedding/head/loss are per row and sit in the slope), which "
        "should not depend on v:"),
        "",
        "| v | slope a (ms per microbatch) | intercept b (ms) | (p−1)·a/v (ms) | b − (p−1)·a/v (ms) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for v, rs in per_round.items():
        a, b = fits[v]
        table.append(f"| {v} | {spread([x * 1e3 for x, _ in rs], 2)} | {spread([y * 1e3 for _, y in rs], 2)} "
                     f"| {(p - 1) * a / v * 1e3:.2f} | {spread([(y - (p - 1) * x / v) * 1e3 for x, y in rs], 2)} |")
    if 1 in args.virtual_stages and len(args.virtual_stages) > 1:
        a1 = fits[1][0]
        table += [
            "",
            ("Interleaving saves (p−1)·(1 − 1/v) ticks at the same m, whatever the fixed overhead: "
            "T(m, 1) − T(m, v), per-round differences, against (p−1)·(a₁ − a₁/v) "
            "with a₁ the v=1 slope:"),
            "",
            "| v | m | T(m,1) − T(m,v) (ms) | predicted (ms) |",
            "|---:|---:|---:|---:|",
        ]
        for v, m in pairs:
            if v > 1 and (1, m) in cases:
                diff = [(x - y) * 1e3 for x, y in zip(times[1, m], times[v, m])]
                table.append(f"| {v} | {m} | {spread(diff, 2)} | {(p - 1) * (a1 - a1 / v) * 1e3:.2f} |")
    print("\n".join(table), flush=True)
    lines += table

    # Communication of one configuration, from the compiled HLO.
    v0 = max(args.virtual_stages)
    m0 = max(m for w, m in pairs if w == v0)
    hidden, seq = cases[v0, m0].config.model.hidden_size, cases[v0, m0].config.train.seq_len
    sp = Case(mesh, m0, v0, ("model.sequence_parallel=true",))
    comm = [
        "",
        f"### Pipeline communication (v={v0}, m={m0}: {v0 * m0 + p - 1} ticks forward and backward)",
        "",
        (f"Each tick hands one microbatch activation [mb={MICROBATCH_ROWS}, seq={seq}, hidden={hidden}] float32 "
        f"({MICROBATCH_ROWS * seq * hidden * 4 / 1024:g} KiB) to the next stage with one collective-permute; "
        f"with `model.sequence_parallel=true` its 1/TP sequence shard. The permute sits once in the tick "
        "loop's body (forward) and once in its transpose (backward); per step it runs once per tick in each. "
        "From `hlo.collectives_per_step` on `step.lower(inputs, targets).compile().as_text()`, per device:"),
        "",
        *permute_lines("sequence_parallel=false", cases[v0, m0].hlo()),
        *permute_lines(f"sequence_parallel=true (TP={t})", sp.hlo()),
        "",
    ]
    print("\n".join(comm), flush=True)
    lines += comm
    if args.out:
        write_report(lines, args.out)


if __name__ == "__main__":
    main()
