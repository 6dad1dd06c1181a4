"""One jit-compiled training step: loss, gradients, AdamW update.

Sharding. Parameters and optimizer state keep their PartitionSpecs (the
optimizer's moments carry their parameter's spec); the batch rows are split
over "data" x "expert". The model runs in one region where every axis in use
is manual: gradients of parameters replicated across a TP group are summed
over "tensor" where the group's partial results meet (``copy_to_tensor_region``
backward, inside the layers), then gradients of parameters replicated across
data-parallel ranks are summed over "data" (and "expert") once, by the
backward of ``broadcast_over`` at region entry (``parallel/region.py``).
The global gradient norm for clipping is computed over the sharded gradients
with one all-reduce (``parallel/grads.py``; padding is zero, so it adds nothing).
A step whose loss, gradient norm or updated parameters (their global norm: one
more scalar all-reduce) are not finite reports ``skipped = 1``. Under
``train.on_nonfinite: skip`` it also leaves parameters and optimizer state as
they were (a select per array, inside the compiled step); under ``stop`` the
loop ends the run at that step, so the step does not pay for that select (12%
of its memory traffic on a 256-wide model) and the state it leaves in memory
is never saved or used again.

Gradient accumulation (``train.grad_accum = k``): each rank's rows are split
into k micro-steps (rows i, i+k, i+2k, ...: a local reshape), run one after
the other by ``jax.lax.scan``; their gradients are summed in float32 and
divided by k, then one optimizer update. The loss and update equal those of
the whole batch, with the activation memory of 1/k of it. Pipeline
microbatches split each micro-step again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lite_tp_jax.core.collectives import deterministic_collectives
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.parallel.grads import clip_by_norm, global_norm
from lite_tp_jax.run.config import TrainConfig
from lite_tp_jax.run.optimizer import learning_rate_schedule
from lite_tp_jax.sharding.rules import batch_sharding, batch_spec, param_shardings


def keep_where_finite(finite: jax.Array, updated: Any, previous: list[jax.Array]) -> Any:
    """``updated`` where ``finite`` (a scalar bool) holds, else ``previous``: under
    ``on_nonfinite: skip`` an update with a non-finite loss, gradient norm or
    resulting parameter is dropped inside the compiled step (a select per
    array, no recompile)."""
    leaves, structure = jax.tree.flatten(updated)
    return jax.tree.unflatten(structure, [jnp.where(finite, new, old) for new, old in zip(leaves, previous, strict=True)])


class TrainStep:
    """``step(tokens, targets) -> metrics``: updates ``model`` and ``optimizer`` in place.

    The step is compiled once; state buffers are donated so parameters and
    optimizer moments are updated without a second copy in device memory.
    With ``train.deterministic`` it is traced (and cached) in deterministic
    mode: every reduction in fixed rank order (``collectives.py``).
    """

    def __init__(self, model: Transformer, optimizer: nnx.Optimizer, train: TrainConfig):
        self.model, self.optimizer = model, optimizer
        self.schedule = learning_rate_schedule(train)
        self.grad_clip = train.grad_clip
        self.microbatches, self.grad_accum = train.microbatches, train.grad_accum
        self.deterministic = train.deterministic
        self.drop_nonfinite = train.on_nonfinite == "skip"
        mesh = model.mesh
        self.graphdef, state = nnx.split((model, optimizer))
        # The step reads and writes the Variables' arrays as a flat list: walking the
        # module graph (nnx.state / nnx.update) on every call costs milliseconds of Python.
        self._variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        self._structure = jax.tree.structure(state)
        shardings = jax.tree.leaves(param_shardings(state, mesh))
        self._step: Callable = jax.jit(
            self._flat_step,
            in_shardings=(shardings, batch_sharding(mesh), batch_sharding(mesh)),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )

    def _flat_step(self, arrays, tokens, targets):
        new_state, metrics = self._pure_step(jax.tree.unflatten(self._structure, arrays), tokens, targets)
        return jax.tree.leaves(new_state), metrics

    def _pure_step(self, state, tokens, targets):
        previous = jax.tree.leaves(state)  # the arrays; merge's Variables are updated in place
        model, optimizer = nnx.merge(self.graphdef, state)
        (loss, metrics), grads = self._loss_and_grads(model, tokens, targets)
        grad_norm = global_norm(grads, model.mesh)  # one all-reduce
        lr = self.schedule(optimizer.step[...])
        optimizer.update(model, clip_by_norm(grads, grad_norm, self.grad_clip))
        param_norm = global_norm(nnx.state(model, nnx.Param), model.mesh)  # one all-reduce
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        new_state = nnx.state((model, optimizer))
        if self.drop_nonfinite:
            new_state = keep_where_finite(finite, new_state, previous)
        metrics = {"loss": loss, **metrics, "grad_norm": grad_norm, "param_norm": param_norm, "lr": lr,
                   "skipped": (~finite).astype(jnp.float32)}
        return new_state, metrics

    def _loss_and_grads(self, model: Transformer, tokens: jax.Array, targets: jax.Array):
        """``((loss, metrics), grads)`` of the whole batch, as the mean over
        ``grad_accum`` scanned micro-steps."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params, tokens, targets):
            return nnx.merge(graphdef, params, rest).loss(tokens, targets, self.microbatches)

        value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
        k = self.grad_accum
        if k == 1:
            return value_and_grad(params, tokens, targets)

        micro_rows = NamedSharding(model.mesh, P(None, *batch_spec()))

        def micro_steps(rows):  # [B, S] -> [k, B/k, S]; step i: rows i, i+k, ... (local on every rank)
            rows = rows.reshape(rows.shape[0] // k, k, rows.shape[1]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(rows, micro_rows)

        def accumulate(total, batch):
            (loss, metrics), grads = value_and_grad(params, *batch)
            return jax.tree.map(jnp.add, total, grads), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, params)
        total, (losses, metrics) = jax.lax.scan(accumulate, zeros, (micro_steps(tokens), micro_steps(targets)))
        mean = functools.partial(jnp.mean, axis=0)
        return (mean(losses), jax.tree.map(mean, metrics)), jax.tree.map(lambda g: g / k, total)

    def _arrays(self) -> list:
        return [variable.get_raw_value() for variable in self._variables]

    def lower(self, tokens: jax.Array, targets: jax.Array):
        """The lowered step (for HLO inspection) without running it."""
        with deterministic_collectives(self.deterministic):
            return self._step.lower(self._arrays(), tokens, targets)

    def export(self, tokens: jax.Array, targets: jax.Array, *, platforms: tuple[str, ...]) -> jax.export.Exported:
        """The step lowered for ``platforms`` (``"cuda"``, ``"tpu"``, ...) with
        ``jax.export``; no device of those platforms is needed. The MoE exchange's
        ``ragged_all_to_all`` (GPU, TPU) lowers to a custom call that ``jax.export``
        gives no compatibility guarantee for; it is allowed here."""
        allowed = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
        with deterministic_collectives(self.deterministic):
            return jax.export.export(self._step, platforms=platforms, disabled_checks=allowed)(
                self._arrays(), tokens, targets
            )

    def __call__(self, tokens: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
        with deterministic_collectives(self.deterministic):
            new_arrays, metrics = self._step(self._arrays(), tokens, targets)
        for variable, array in zip(self._variables, new_arrays, strict=True):
            variable.set_raw_value(array)
        return metrics
