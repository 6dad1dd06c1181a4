"""Deterministic collectives against the default ones: step time and bytes.

    python benchmarks/deterministic.py [--data 2] [--tensor 4] [--repeats 20] [--out FILE.md]

Workloads: one ``TrainStep`` (forward, backward, AdamW) of configs/tiny.yaml,
and of the same model 4 layers deep and 512 wide (8 heads, ffn 1376), at
``data x tensor``, batch 8 x 64 tokens. For each, the step is compiled twice
from one model, in default mode (``psum`` / ``psum_scatter``) and with
``train.deterministic`` (all-to-all, sum in rank order, all-gather); both are
warmed up and then run interleaved ``--repeats`` times. Reported: the median
step times and their ratio, and from each compiled HLO the collectives run per
step (loop bodies times their trip counts) with the bytes each device sends on
a ring: ``2(n-1)/n`` of an all-reduced array, ``(n-1)/n`` of an all-gathered or
all-to-all'd one, ``(n-1)`` times a reduce-scatter's result (n = the group
size read from ``replica_groups``). Without an accelerator the devices are
fake CPU devices sharing the host's cores: times measure overhead, not speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import time

import jax
import numpy as np

from lite_tp_jax.core.hlo import KINDS, collectives_per_step
from lite_tp_jax.core.mesh import make_mesh_for
from lite_tp_jax.runtime.devices import provide_cpu_devices
from lite_tp_jax.run.config_file import load_config
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.sharding.rules import batch_sharding
from lite_tp_jax.train.decoder_step import decoder_step
from report import machine, write_report  # benchmarks/report.py

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "tiny.yaml")
MODELS = {
    "tiny (2 layers, 64 wide)": (),
    "4 layers, 512 wide": ("model.num_layers=4", "model.hidden_size=512", "model.num_heads=8",
                           "model.num_kv_heads=8", "model.ffn_hidden_size=1376"),
}

_WIRE = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
         "all-to-all": lambda n: (n - 1) / n, "reduce-scatter": lambda n: n - 1, "collective-permute": lambda n: 1}


def per_step(hlo_text: str, devices: int) -> dict[str, tuple[int, float, float]]:
    """``{kind: (count, array bytes, ring bytes sent per device)}`` per step
    (``hlo.collectives_per_step``; a collective without groups spans all ``devices``)."""
    out = {kind: [0, 0.0, 0.0] for kind in KINDS}
    for c, times in collectives_per_step(hlo_text):
        n = len(c.groups[0]) if c.groups else devices
        entry = out[c.kind]
        entry[0] += times
        entry[1] += times * c.bytes
        entry[2] += times * c.bytes * _WIRE[c.kind](n)
    return {kind: tuple(v) for kind, v in out.items() if v[0]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=int, default=2)
    parser.add_argument("--tensor", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    if os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        provide_cpu_devices(args.data * args.tensor)
    mesh_sets = (f"mesh.data={args.data}", f"mesh.tensor={args.tensor}", "train.global_batch=8", "train.seq_len=64")
    lines = [
        "# Deterministic collectives vs default",
        "",
        f"`python benchmarks/deterministic.py --data {args.data} --tensor {args.tensor} --repeats {args.repeats}`, "
        f"{datetime.date.today()}; {machine()}; jax {jax.__version__}.",
        "",
        "| model | default step (ms) | deterministic step (ms) | time ratio | default bytes/device/step | "
        "deterministic bytes/device/step | bytes ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    details = []
    for label, overrides in MODELS.items():
        config = load_config(CONFIG, (*mesh_sets, *overrides))
        mesh = make_mesh_for({"data": args.data, "pipeline": 1, "expert": 1, "tensor": args.tensor})
        model, optimizer = create_model_and_optimizer(config.model, config.train, mesh)
        steps = {det: decoder_step(model, optimizer, dataclasses.replace(config.train, deterministic=det))
                 for det in (False, True)}
        tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (8, 65), dtype=np.int32)
        batch = jax.device_put((tokens[:, :-1], tokens[:, 1:]), batch_sharding(mesh))
        traffic = {det: per_step(step.lower(batch).compile().as_text(), args.data * args.tensor) for det, step in steps.items()}
        for step in steps.values():
            for _ in range(3):
                jax.block_until_ready(step(batch))
        times = {det: [] for det in steps}
        for _ in range(args.repeats):
            for det, step in steps.items():
                start = time.perf_counter()
                jax.block_until_ready(step(batch))
                times[det].append(time.perf_counter() - start)
        median = {det: statistics.median(t) * 1e3 for det, t in times.items()}
        wire = {det: sum(v[2] for v in traffic[det].values()) for det in steps}
        lines.append(f"| {label} | {median[False]:.1f} | {median[True]:.1f} | {median[True] / median[False]:.3f} | "
                     f"{wire[False] / 1024:,.1f} KiB | {wire[True] / 1024:,.1f} KiB | {wire[True] / wire[False]:.3f} |")
        for det in steps:
            kinds = "; ".join(f"{kind} ×{n}: {b / 1024:,.1f} KiB arrays, {w / 1024:,.1f} KiB sent"
                              for kind, (n, b, w) in traffic[det].items())
            details.append(f"- {label}, {'deterministic' if det else 'default'}: {kinds}")
        del model, optimizer, steps
    lines += ["", "Collectives per step (count, bytes of the arrays, bytes each device sends on a ring):", "", *details,
              "", "Time ratio: median deterministic step / median default step, interleaved runs."]
    print("\n".join(lines))
    if args.out:
        write_report(lines, args.out)


if __name__ == "__main__":
    main()
