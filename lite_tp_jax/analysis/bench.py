"""``lite-tp bench``: one training step three ways, in one process, on the same
devices and the same weights.

    lite_tp_jax  ``TrainStep``: one shard_map region, explicit Megatron collectives
    gspmd        the same math in plain ``jax.numpy`` under ``jax.jit``, parameters
                 placed with the same PartitionSpecs as ``NamedSharding`` (their
                 logical form, ``state.logical_sharding``), batch rows over the
                 batch axes; XLA's partitioner (GSPMD) picks the collectives. With
                 an "fsdp" axis this is GSPMD's FSDP (MaxText's default): the
                 parameters and moments split over "fsdp" as ``NamedSharding``,
                 the partitioner gathering them where it sees fit
    one_device   the plain version, unsharded, on the first device

Each is compiled once (timed) and warmed up; a few steps check that lite_tp_jax
and gspmd do the same work (losses and gradient norms). Then the three run
interleaved for ``steps`` rounds, each round in a random (seeded) order, so
that no variant always runs right after the same one; ratios are medians of
the per-round ratios, with their interquartile range. Collective bytes per device per step come from
the compiled HLO (``hlo.bytes_by_axis``), memory per device from
``compiled.memory_analysis()`` (arguments + outputs + temporaries - donated
aliases), and the lite_tp_jax step's compiled memory with sequence
parallelism on and off (at tensor > 1; ``model.sequence_parallel: auto``, the
default, turns it on there). Also: compile time against depth, for models that
differ only in ``num_layers``.

The baseline (``reference_model.py``) implements dense models without
pipelining: a config with experts or a pipeline axis is refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from lite_tp_jax.analysis.planner import abstract_model_and_optimizer
from lite_tp_jax.analysis.reference_model import nested, plain_train_step
from lite_tp_jax.core import hlo
from lite_tp_jax.core.axes import describe
from lite_tp_jax.core.errors import BadInput
from lite_tp_jax.core.mesh import make_mesh_for
from lite_tp_jax.run.config import Config
from lite_tp_jax.run.optimizer import create_model_and_optimizer
from lite_tp_jax.runtime.run_dir import atomic_write
from lite_tp_jax.sharding.rules import batch_sharding
from lite_tp_jax.sharding.state import export_state, flat_variables, logical_shape, logical_sharding, spec_of
from lite_tp_jax.train.decoder_step import decoder_step

VARIANTS = ("lite_tp_jax", "gspmd", "one_device")


# --- measuring -------------------------------------------------------------------------


def memory_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries - donated aliases, per device."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def quartiles(values: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


def max_rel_err(a, b) -> float:
    def one(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))

    return max(jax.tree.leaves(jax.tree.map(one, a, b)))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def check_supported(config: Config) -> None:
    if config.model.moe_every:
        raise BadInput("lite-tp bench compares dense models only (its GSPMD baseline has no experts); "
                         "set model.moe_every=0")
    if config.mesh.pipeline not in (1,) or config.mesh.expert not in (1,):
        raise BadInput("lite-tp bench needs mesh.pipeline=1 and mesh.expert=1 (its GSPMD baseline "
                         "shards the batch and the layers' weights only)")


class _Variants:
    """The three steps built on one mesh from one set of weights."""

    def __init__(self, config: Config, mesh):
        model_cfg, train = config.model, config.train
        self.model, self.optimizer = create_model_and_optimizer(model_cfg, train, mesh)
        self.ours = decoder_step(self.model, self.optimizer, train)
        rng = np.random.default_rng(1)
        tokens = rng.integers(0, model_cfg.vocab_size, (train.global_batch, train.seq_len + 1), dtype=np.int32)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        one = SingleDeviceSharding(mesh.devices.flat[0])
        logical = nested({n: logical_sharding(v, mesh) for n, v in flat_variables(self.model).items()})
        weights = nested(export_state(self.model))
        self.batches, self.states, self.steps = {}, {}, {}
        for name, shardings, replicated, rows in (
            ("gspmd", logical, NamedSharding(mesh, P()), batch_sharding(mesh)),
            ("one_device", jax.tree.map(lambda _: one, logical), one, one),
        ):
            params = jax.device_put(weights, shardings)
            tx, step, placement = plain_train_step(model_cfg, train, params, shardings, replicated, rows)
            self.states[name] = jax.device_put((params, tx.init(params), np.int32(0)), placement)
            self.steps[name] = step
            self.batches[name] = jax.device_put((inputs, targets), rows)
        self.batches["lite_tp_jax"] = jax.device_put((inputs, targets), batch_sharding(mesh))
        self.compiled, self.compile_s = {}, {}
        for name in VARIANTS:
            lower = (lambda: self.ours.lower(self.batches[name])) if name == "lite_tp_jax" else (
                lambda name=name: self.steps[name].lower(self.states[name], *self.batches[name]))
            self.compiled[name], self.compile_s[name] = _timed(lambda: lower().compile())

    def run(self, name: str):
        if name == "lite_tp_jax":
            return self.ours(self.batches[name])
        self.states[name], metrics = self.compiled[name](self.states[name], *self.batches[name])
        return metrics


def compile_seconds_vs_depth(config: Config, mesh, depths: list[int]) -> list[dict]:
    """Compile time of the lite_tp_jax and gspmd steps for models of each depth
    (abstract state: nothing is materialised)."""
    rows = []
    tokens = jax.ShapeDtypeStruct((config.train.global_batch, config.train.seq_len), jnp.int32,
                                  sharding=batch_sharding(mesh))
    for layers in depths:
        cfg = dataclasses.replace(config.model, num_layers=layers)
        model, optimizer = abstract_model_and_optimizer(cfg, config.train, mesh)
        _, ours = _timed(lambda: decoder_step(model, optimizer, config.train).lower((tokens, tokens)).compile())
        variables = flat_variables(model)
        shardings = nested({n: logical_sharding(v, mesh) for n, v in variables.items()})
        params = nested({n: jax.ShapeDtypeStruct(logical_shape(v), v.dtype, sharding=logical_sharding(v, mesh))
                          for n, v in variables.items()})
        replicated = NamedSharding(mesh, P())
        tx, step, placement = plain_train_step(cfg, config.train, params, shardings, replicated, batch_sharding(mesh))
        state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             (params, jax.eval_shape(tx.init, params), jax.ShapeDtypeStruct((), jnp.int32)),
                             placement)
        _, gspmd = _timed(lambda: step.lower(state, tokens, tokens).compile())
        rows.append({"num_layers": layers, "lite_tp_jax_compile_s": ours, "gspmd_compile_s": gspmd})
    return rows


def sequence_parallel_memory(config: Config, mesh, compiled_bytes: int | None) -> dict | None:
    """Memory per device of the lite_tp_jax step with sequence parallelism on and
    off: ``compiled_bytes`` (the benchmarked step's) for the config's choice, the
    other compiled here (abstract state, never run); and the choice's one line.
    None at tensor 1."""
    if mesh.shape["tensor"] == 1:
        return None
    chosen, line = config.model.with_sequence_parallel(mesh.shape, config.train.seq_len)
    other = not chosen.sequence_parallel
    tokens = jax.ShapeDtypeStruct((config.train.global_batch, config.train.seq_len), jnp.int32,
                                  sharding=batch_sharding(mesh))
    model, optimizer = abstract_model_and_optimizer(dataclasses.replace(chosen, sequence_parallel=other), config.train, mesh)
    compiled = decoder_step(model, optimizer, config.train).lower((tokens, tokens)).compile()
    return {"chosen": line, "on" if other else "off": memory_bytes(compiled),
            "off" if other else "on": compiled_bytes}


def run(config: Config, *, steps: int = 20, depths: list[int] = (2, 8, 32), warmup: int = 2,
        check_steps: int = 3, config_name: str | None = None) -> dict:
    """Benchmarks ``config``'s training step; returns the result as a JSON-ready dict."""
    check_supported(config)
    if steps < 2:
        raise BadInput(f"lite-tp bench needs at least 2 timed steps for quartiles, got {steps}")
    sizes = config.mesh.sizes(len(jax.devices()))
    mesh = make_mesh_for(sizes)
    variants = _Variants(config, mesh)

    history = {name: [jax.device_get({k: m[k] for k in ("loss", "grad_norm")}) for m in
                      (variants.run(name) for _ in range(check_steps))] for name in ("lite_tp_jax", "gspmd")}
    for _ in range(warmup):
        for name in VARIANTS:
            jax.block_until_ready(variants.run(name))
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    order = random.Random(0)
    for _ in range(steps):  # each round in a random order: no variant always follows the same one
        for name in order.sample(VARIANTS, len(VARIANTS)):
            _, seconds = _timed(lambda: jax.block_until_ready(variants.run(name)))
            times[name].append(seconds)

    per_variant = {}
    for name in VARIANTS:
        compiled = variants.compiled[name]
        by_axis = hlo.bytes_by_axis(compiled.as_text(), mesh)
        per_variant[name] = {
            "median_step_s": statistics.median(times[name]),
            "step_s": times[name],
            "compile_s": variants.compile_s[name],
            "collective_bytes_per_step_per_device": sum(by_axis.values()),
            "collective_bytes_by_axis": by_axis,
            "memory_bytes_per_device": memory_bytes(compiled),
        }
    replicated = gspmd_replicated(variants.model, mesh)
    ratio = lambda a, b: quartiles([x / y for x, y in zip(times[a], times[b])])  # noqa: E731
    return {
        "config": config_name,
        "mesh": sizes,
        "model": dataclasses.asdict(config.model),
        "batch": {"global_batch": config.train.global_batch, "seq_len": config.train.seq_len},
        "machine": machine(),
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "timed_rounds": steps,
        "warmup_rounds": warmup,
        "same_work_max_rel_err": max_rel_err(history["lite_tp_jax"], history["gspmd"]),
        "variants": per_variant,
        "gspmd_replicated_parameters": replicated,
        "ratios": {"lite_tp_jax/gspmd": ratio("lite_tp_jax", "gspmd"),
                   "lite_tp_jax/one_device": ratio("lite_tp_jax", "one_device")},
        "compile_vs_depth": compile_seconds_vs_depth(config, mesh, list(depths)),
        "sequence_parallel_memory_bytes_per_device": sequence_parallel_memory(
            config, mesh, per_variant["lite_tp_jax"]["memory_bytes_per_device"]),
    }


def gspmd_replicated(model, mesh) -> list[str]:
    """The parameters lite_tp_jax splits (padded) that the GSPMD baseline keeps whole
    on some dim: a ``NamedSharding`` splits only dims the axes divide, so GSPMD
    replicates an uneven dim (4 heads at tensor 8), moving fewer bytes and
    computing that part on every rank."""
    names = []
    for name, variable in flat_variables(model).items():
        trailing = len(variable.get_metadata().get("logical_shape", variable.shape))
        stored = (tuple(spec_of(variable)) + (None,) * len(variable.shape))[: len(variable.shape)][-trailing:]
        logical = tuple(logical_sharding(variable, mesh).spec)
        logical = (logical + (None,) * len(logical_shape(variable)))[: len(logical_shape(variable))][-trailing:]
        if any(s is not None and l is None for s, l in zip(stored, logical)):
            names.append(name)
    return sorted(names)


# --- reporting ---------------------------------------------------------------------------


def machine() -> str:
    """CPU model and cores, and the jax devices (fake when the backend is cpu)."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    kind = jax.default_backend()
    fake = " fake" if kind == "cpu" else ""
    device_kind = jax.devices()[0].device_kind
    named = "" if device_kind == kind else f" ({device_kind})"
    return f"{cpu}, {os.cpu_count()} cores; {len(jax.devices())}{fake} {kind} devices{named}"


def to_json(result: dict) -> str:
    return json.dumps(result, indent=1)


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def format_result(result: dict) -> str:
    mesh = describe(result["mesh"])
    r = result["ratios"]
    lines = [f"{result['config']} on {mesh} ({result['machine']}); {result['timed_rounds']} interleaved rounds",
             f"same work: max relative error of losses and grad norms vs gspmd {result['same_work_max_rel_err']:.1e}",
             "",
             f"{'variant':12s} {'median step ms':>15s} {'compile s':>10s} {'collectives/device':>19s} "
             f"{'memory/device':>14s}"]
    for name, v in result["variants"].items():
        lines.append(f"{name:12s} {v['median_step_s'] * 1e3:15.2f} {v['compile_s']:10.2f} "
                     f"{_mib(v['collective_bytes_per_step_per_device']):>19s} {_mib(v['memory_bytes_per_device']):>14s}")
    replicated = result.get("gspmd_replicated_parameters")
    if replicated:
        lines.append(f"note: gspmd keeps {len(replicated)} parameters whole where their dims do not divide by the "
                     f"mesh (e.g. {', '.join(replicated[:3])}): it moves fewer bytes for them and computes them on "
                     f"every rank; lite_tp_jax pads and splits them")
    lines.append("")
    for key, q in r.items():
        lines.append(f"{key}: {q['median']:.3f} (IQR {q['q1']:.3f}-{q['q3']:.3f})")
    sp = result.get("sequence_parallel_memory_bytes_per_device")
    if sp:
        lines += ["", f"lite_tp_jax memory/device with sequence parallelism on {_mib(sp['on'])}, off {_mib(sp['off'])} "
                      f"({sp['off'] / sp['on']:.2f}x); this config: {sp['chosen']}"]
    if result["compile_vs_depth"]:
        lines += ["", "compile time vs depth (s): " + ", ".join(
            f"{row['num_layers']} layers: {row['lite_tp_jax_compile_s']:.2f} (gspmd {row['gspmd_compile_s']:.2f})"
            for row in result["compile_vs_depth"])]
    return "\n".join(lines)


def write(result: dict, path: str | os.PathLike) -> None:
    """The JSON at ``path`` and a PNG plot beside it (same name, .png), each
    written whole or not at all (``runtime.run_dir.atomic_write``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    atomic_write(path, to_json(result) + "\n")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(result["variants"])
    left.boxplot([np.array(result["variants"][n]["step_s"]) * 1e3 for n in names])
    left.set_xticks(range(1, len(names) + 1), names)
    left.set_ylabel("step time (ms)")
    left.set_title("training step, interleaved rounds")
    depth = result["compile_vs_depth"]
    if depth:
        layers = [row["num_layers"] for row in depth]
        right.plot(layers, [row["lite_tp_jax_compile_s"] for row in depth], "o-", label="lite_tp_jax")
        right.plot(layers, [row["gspmd_compile_s"] for row in depth], "s--", label="gspmd")
        right.set_xscale("log", base=2)
        right.set_xlabel("layers")
        right.set_ylabel("compile time (s)")
        right.set_title("compile time vs depth")
        right.legend()
    fig.suptitle(f"{result['config']}: {describe(result['mesh'])}")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path.with_suffix(".png"), png.getvalue())
