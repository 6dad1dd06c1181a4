"""What a training step costs: model FLOPs, MFU per step, memory per device.

Before step 1 the trainer compiles the step ahead of time (``compile_step``;
jit then reuses the executable) and prints, as MaxText does, the compiled
program's memory per device (XLA's ``memory_analysis``: arguments, outputs,
temporaries) and the model FLOPs per step (``models/flops.py``, where the
FLOP convention is written down). Each step record then carries
``tokens_per_s`` and, given the devices' peak FLOP/s (``--peak-tflops``, or the
device profile the CLI matched, ``analysis/profiles.py``), ``mfu``:

    mfu = flops_per_step / (step_time_s x devices in the mesh x peak per device)
"""

from __future__ import annotations

import time

import jax

from lite_tp_jax.models.flops import training_flops_per_step
from lite_tp_jax.run.config import Config
from lite_tp_jax.runtime.compile_cache import CacheHits
from lite_tp_jax.sharding.rules import batch_sharding
from lite_tp_jax.train.step import TrainStep

MIB = 2**20


class StepCost:
    """Model FLOPs and tokens of one step of ``config`` on ``devices`` devices; MFU against ``peak_flops``."""

    def __init__(self, config: Config, devices: int, peak_flops: float | None):
        train = config.train
        # what model.sequence_parallel ("auto") chose on this mesh, said in the line before step 1
        self.sequence_parallel = config.model.with_sequence_parallel(config.mesh.sizes(devices), train.seq_len)[1]
        self.tokens = train.global_batch * train.seq_len
        self.flops = training_flops_per_step(config.model, train.global_batch, train.seq_len)
        self.devices, self.peak_flops = devices, peak_flops

    def rates(self, seconds: float) -> dict[str, float]:
        """``tokens_per_s`` and (with a peak) ``mfu`` of a step that took ``seconds``."""
        rates = {"tokens_per_s": self.tokens / seconds}
        if self.peak_flops:
            rates["mfu"] = self.flops / (seconds * self.devices * self.peak_flops)
        return rates


def compile_step(step: TrainStep, batch: tuple, mesh) -> dict:
    """Compiles ``step`` for batches shaped like ``batch`` (a persistent-cache hit
    loads it instead): the persistent cache's hits and misses meanwhile, and
    the compiled program's bytes per device (``memory_analysis``)."""
    hits, misses = CacheHits.get().counts()
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_sharding(mesh)) for a in batch]  # 2, or 3 packed
    started = time.perf_counter()
    lowered = step.lower(tuple(shapes))  # tracing and lowering: Python, never cached
    lowered_at = time.perf_counter()
    compiled = lowered.compile()  # XLA, or a load from the persistent cache
    now_hits, now_misses = CacheHits.get().counts()
    figures = {"trace_lower_s": round(lowered_at - started, 3), "xla_compile_s": round(time.perf_counter() - lowered_at, 3),
               "cache_hits": now_hits - hits, "cache_misses": now_misses - misses}
    memory = compiled.memory_analysis()
    if memory is not None:
        figures.update(argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
                       alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes)
    return figures


def describe(event: dict, seconds: float, cost: StepCost) -> str:
    """The line printed before step 1."""
    loaded = event["cache_hits"] and not event["cache_misses"]
    line = (f"training step {'loaded from the compilation cache' if loaded else 'compiled'} in {seconds:.2f} s "
            f"(tracing and lowering {event['trace_lower_s']:.2f} s, {'loading' if loaded else 'XLA'} "
            f"{event['xla_compile_s']:.2f} s)")
    if "temp_bytes" in event:
        peak = event["argument_bytes"] + event["output_bytes"] - event["alias_bytes"] + event["temp_bytes"]
        line += (f"; memory per device {peak / MIB:.1f} MiB (arguments {event['argument_bytes'] / MIB:.1f}, "
                 f"outputs {event['output_bytes'] / MIB:.1f} of which {event['alias_bytes'] / MIB:.1f} donated, "
                 f"temporaries {event['temp_bytes'] / MIB:.1f})")
    line += f"; model FLOPs per step {cost.flops:.3g} ({cost.flops / cost.devices:.3g} per device"
    if cost.peak_flops:
        line += f", peak {cost.peak_flops / 1e12:.4g} TFLOP/s per device for MFU"
    return line + f"); {cost.sequence_parallel}"
