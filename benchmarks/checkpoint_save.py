"""The step-time cost of a checkpoint: a blocking save vs the asynchronous one.

    python benchmarks/checkpoint_save.py [--tensor 2] [--window 4] [--repeats 5] [--out FILE.md]

Workload: ``TrainStep`` of configs/tiny.yaml scaled up (hidden 256, 4 layers,
ffn 688, seq 128, batch 8) on a mesh of ``--tensor`` devices. A *window* is
``--window`` consecutive steps; three variants of it run interleaved, round
after round, each in its own checkpoint directory:

* no save: the steps alone;
* blocking save ("before"): a checkpoint after the first step, and the
  training waits until it is written and sealed (``save`` then ``wait``: what
  ``Checkpointer.save`` did before saves became asynchronous);
* async save ("after"): the same checkpoint with ``Checkpointer.save`` as the
  training loop calls it: it returns once the arrays are in host memory, and
  the files are written while the next steps run. The window ends with
  ``wait()``, so a write that outlasts the window is counted.

Reported: the median window time; per round the window's time over the
no-save window's (median and interquartile range); the window minus the
no-save window (the save's total cost, noisy: a difference of two windows);
and the time the training loop was stalled inside ``save``/``wait`` (the
direct measure of what async saving removes). On a 2-core machine the
writer thread competes with the steps for the same cores, so the overlap is
partial; with idle cores (or an accelerator) the async cost falls to the
device-to-host copy.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from report import machine, write_report  # benchmarks/report.py

from lite_tp_jax.core.mesh import make_mesh_for
from lite_tp_jax.runtime.devices import provide_cpu_devices
from lite_tp_jax.run.checkpoint import Checkpointer
from lite_tp_jax.run.config_file import load_config
from lite_tp_jax.train.data import Batches, load_tokens
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.sharding.rules import batch_sharding
from lite_tp_jax.train.decoder_step import decoder_step

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "model.hidden_size=256", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=4",
    "model.ffn_hidden_size=688", "train.seq_len=128", "train.global_batch=8", "train.warmup_steps=1",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensor", type=int, default=2)
    parser.add_argument("--window", type=int, default=4, help="steps per measured window (one save in it)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the markdown report here")
    args = parser.parse_args()
    if os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        provide_cpu_devices(args.tensor)  # before the first jax operation

    config = load_config(REPO / "configs" / "tiny.yaml", [*OVERRIDES, f"mesh.tensor={args.tensor}"])
    mesh = make_mesh_for(config.mesh.requested, spares=config.mesh.spares)
    model, optimizer = create_model_and_optimizer(config.model, config.train, mesh)
    step = decoder_step(model, optimizer, config.train)
    batches = Batches(load_tokens(config.data, config.model.vocab_size), config.train.global_batch,
                      config.train.seq_len, config.train.seed)
    inputs, targets = (jax.device_put(a, batch_sharding(mesh)) for a in batches.batch(0))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state((model, optimizer))))

    def train(n):
        for _ in range(n):
            jax.block_until_ready(step((inputs, targets)))

    counter = iter(range(1, 1 << 30))

    def window(checkpointer: Checkpointer | None, blocking: bool) -> tuple[float, float, float]:
        """(the window's time, the stall at the save, the stall in the final wait)."""
        started, at_save, at_end = time.perf_counter(), 0.0, 0.0
        train(1)
        if checkpointer is not None:
            n = next(counter)
            call = time.perf_counter()
            checkpointer.save(n, nnx.state((model, optimizer)), {"step": n})
            if blocking:
                checkpointer.wait()
            at_save = time.perf_counter() - call
        train(args.window - 1)
        if checkpointer is not None:
            call = time.perf_counter()
            checkpointer.wait()
            at_end = time.perf_counter() - call
        return time.perf_counter() - started, at_save, at_end

    with tempfile.TemporaryDirectory() as scratch:
        variants = {
            "no save": (None, False),
            "blocking save (before)": (Checkpointer(Path(scratch) / "blocking", keep=2), True),
            "async save (after)": (Checkpointer(Path(scratch) / "async", keep=2), False),
        }
        for checkpointer, blocking in variants.values():  # compile, warm up the writers
            window(checkpointer, blocking)
        times = {name: [] for name in variants}
        stalls = {name: [] for name in variants}
        at_save = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (checkpointer, blocking) in variants.items():
                elapsed, save_stall, end_stall = window(checkpointer, blocking)
                times[name].append(elapsed)
                stalls[name].append(save_stall + end_stall)
                at_save[name].append(save_stall)
        for checkpointer, _ in variants.values():
            if checkpointer is not None:
                checkpointer.close()
        checkpoint_bytes = sum(f.stat().st_size for f in (Path(scratch) / "async").rglob("*") if f.is_file()) // 2

    base = np.array(times["no save"])
    lines = [
        "# Checkpoint save cost: blocking vs asynchronous",
        "",
        f"{datetime.date.today()}; {machine()}; jax {jax.__version__}.",
        f"`python benchmarks/checkpoint_save.py --tensor {args.tensor} --window {args.window} --repeats {args.repeats}`",
        "",
        f"State (parameters + AdamW moments): {state_bytes / 2**20:.1f} MiB on devices; "
        f"one checkpoint on disk: {checkpoint_bytes / 2**20:.1f} MiB (orbax OCDBT, compressed). "
        f"Window: {args.window} steps with one save after the first (none in 'no save').",
        "",
        "| variant | median window (ms) | / no save (IQR) | window - no save (ms) | training stalled in save/wait (ms) | of it at the save (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, values in times.items():
        values = np.array(values)
        ratio = values / base
        q1, q3 = np.percentile(ratio, [25, 75])
        cost = statistics.median(values - base) * 1e3
        lines.append(
            f"| {name} | {statistics.median(values) * 1e3:.0f} | {statistics.median(ratio):.3f} ({q1:.3f}-{q3:.3f}) | "
            f"{'-' if name == 'no save' else f'{cost:.0f}'} | {statistics.median(stalls[name]) * 1e3:.0f} | {statistics.median(at_save[name]) * 1e3:.0f} |"
        )
    blocking_cost = np.array(times["blocking save (before)"]) - base
    async_cost = np.array(times["async save (after)"]) - base
    stall_ratio = statistics.median(np.array(stalls["async save (after)"]) / np.array(stalls["blocking save (before)"]))
    lines += ["", f"Training stalled by an async save / by a blocking save, median over rounds: {stall_ratio:.3f}. "
              f"Window cost of an async save / of a blocking save, median over rounds: "
              f"{statistics.median(async_cost / blocking_cost):.2f} (noisy: it is a difference of two windows)."]
    print("\n".join(lines))
    if args.out:
        write_report(lines, args.out)


if __name__ == "__main__":
    main()
