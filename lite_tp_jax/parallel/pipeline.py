"""Pipeline parallelism over the "pipeline" mesh axis, written SPMD-style.

Each of the p ranks of "pipeline" holds ``v`` chunks of layers (``v`` virtual
stages). Layers are stored ``[v, L/v, ...]`` with dim 1 split over
"pipeline", so rank s holds, for each repeat r, the chunk ``r*p + s``: layers
run in their logical order when every microbatch goes around the ring of
stages ``v`` times.

    v = 1   GPipe: m microbatches flow through p stages; (p - 1) / (m + p - 1)
            of the ticks are bubble.
    v > 1   circular (interleaved): the same with v laps; the bubble shrinks to
            (p - 1) / (v*m + p - 1). Needs m >= p (a microbatch coming round
            waits in a buffer on stage 0 until its next lap).

At every tick each stage runs its chunk on the microbatch it holds and hands
the result to the next stage with one ``ppermute`` of one microbatch's
activation (with sequence parallelism: its 1/TP sequence shard). Autodiff of
the tick loop gives the backward schedule (all forwards, then all backwards,
the ppermutes reversed). Each stage does its own tensor-parallel collectives
inside ``stage_fn``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lite_tp_jax.core.collectives import broadcast_over, check_axis, sum_over
from lite_tp_jax.core.axes import PIPELINE
from lite_tp_jax.core.errors import FitError

StageFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]


def run_pipeline(stage_fn: StageFn, chunks: Any, inputs: jax.Array, *, axis: str = PIPELINE) -> tuple[jax.Array, Any]:
    """Runs ``inputs`` (``[m, ...]``: m microbatches) through every stage's chunks.

    ``stage_fn(chunk, x) -> (y, aux)`` runs one chunk of layers on one
    microbatch; ``chunks``: this rank's parameters with a leading ``[v, ...]``
    dim. Returns the last stage's outputs ``[m, ...]`` on every stage (one
    all-reduce over "pipeline") and ``aux`` summed over every microbatch and
    stage. Must run where ``axis`` is manual.
    """
    check_axis(axis)
    stages, stage = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    laps = jax.tree.leaves(chunks)[0].shape[0]
    microbatches = inputs.shape[0]
    check_schedule(stages, microbatches, laps)
    iterations = laps * microbatches
    inputs = broadcast_over(inputs, axis)  # only stage 0 reads them; backward sums over stages
    ring = [(s, (s + 1) % stages) for s in range(stages)] if laps > 1 else [(s, s + 1) for s in range(stages - 1)]

    def tick(carry, t):
        held, outputs, lapped = carry
        i = t - stage  # this stage's iteration: microbatch i % m on lap i // m
        active = (i >= 0) & (i < iterations)
        i = jnp.clip(i, 0, iterations - 1)
        lap, microbatch = i // microbatches, i % microbatches
        first_input = jnp.where(lap == 0, inputs[microbatch], lapped[microbatch])
        x = jnp.where(stage == 0, first_input, held)
        y, aux = stage_fn(jax.tree.map(lambda c: c[lap], chunks), x)
        aux = jax.tree.map(lambda a: jnp.where(active, a, jnp.zeros_like(a)), aux)
        finished = active & (stage == stages - 1) & (lap == laps - 1)
        outputs = outputs.at[microbatch].set(jnp.where(finished, y, outputs[microbatch]))
        received = jax.lax.ppermute(y, axis, ring)
        if laps > 1:  # stage 0 keeps what the last stage finished, for that microbatch's next lap
            j = t - (stages - 1)
            keep = (stage == 0) & (j >= 0) & (j < iterations - microbatches)
            slot = jnp.clip(j, 0, iterations - 1) % microbatches
            lapped = lapped.at[slot].set(jnp.where(keep, received, lapped[slot]))
        return (received, outputs, lapped), aux

    empty = jnp.zeros_like(inputs)
    carry = (empty[0], empty, empty)
    (_, outputs, _), aux = jax.lax.scan(tick, carry, jnp.arange(iterations + stages - 1))
    outputs = sum_over(jnp.where(stage == stages - 1, outputs, jnp.zeros_like(outputs)), axis)
    aux = jax.tree.map(lambda a: sum_over(a.sum(0), axis), aux)
    return outputs, aux


def check_schedule(stages: int, microbatches: int, laps: int) -> None:
    """The circular schedule (``laps`` > 1) needs at least as many microbatches as stages:
    a microbatch coming round waits on stage 0 until its next lap."""
    if laps > 1 and microbatches < stages:
        raise FitError(
            "{microbatches} must be at least {pipeline} for the circular schedule ({virtual_stages} > 1)",
            microbatches=microbatches, pipeline=stages, virtual_stages=laps,
        )


def bubble_fraction(stages: int, microbatches: int, laps: int = 1) -> float:
    """The idle share of a schedule: (p - 1) / (v*m + p - 1)."""
    return (stages - 1) / (laps * microbatches + stages - 1)
