"""One jit-compiled training step of any model: loss, gradients, optimizer update.

``TrainStep(model, optimizer, loss_fn)``: ``loss_fn(model, batch) -> (loss,
metrics)``, ``batch`` any pytree of arrays with rows on dim 0, split over the
batch axes ("data" x "expert" x "fsdp"). The model is one whose parameters carry their
specs (built from the parallel layers) and whose loss runs in one region
(``parallel/region.region``); the optimizer is an ``nnx.Optimizer`` over any
optax transformation (``run/optimizer.py`` builds the decoder's AdamW).

Sharding. Parameters and optimizer state keep their PartitionSpecs (the
optimizer's moments carry their parameter's spec). In the model's region
gradients of parameters replicated across a TP group are summed
over "tensor" where the group's partial results meet (``copy_to_tensor_region``
backward, inside the layers), then gradients of parameters replicated across
data-parallel ranks are summed over "data" (and "expert") once, by the
backward of ``broadcast_over`` at region entry (``parallel/region.py``).
The global gradient norm (for clipping with ``grad_clip``) is computed over the
sharded gradients with one all-reduce (``parallel/grads.py``; padding is zero,
so it adds nothing).
With ``bias_update_rate`` (auxiliary-loss-free MoE balancing, ``layers/moe.py``)
the "gradients" of the ``ExpertBias`` variables are the step's load errors: they
are left out of the norm and of the optimizer, and each bias moves by
``-rate * sign(error)``.
A step whose loss, gradient norm or updated parameters (their global norm: one
more scalar all-reduce) are not finite reports ``skipped = 1``. With
``on_nonfinite="skip"`` it also leaves parameters and optimizer state as
they were (a select per array, inside the compiled step); with ``"stop"`` the
loop ends the run at that step, so the step does not pay for that select (12%
of its memory traffic on a 256-wide model) and the state it leaves in memory
is never saved or used again.

Gradient accumulation (``grad_accum = k``): each rank's rows of every batch
array are split into k micro-steps (rows i, i+k, i+2k, ...: a local reshape), run one after
the other by ``jax.lax.scan``; their gradients are summed in float32 and
divided by k, then one optimizer update. The loss and update equal those of
the whole batch (for a loss that is a mean over rows), with the activation memory of 1/k of it.
A loss that is a mean over counted tokens and reports their number as the
metric ``trained_tokens`` (the decoder's, whose packed batches count fewer
targets than rows x seq) has each micro-step weighted by that count instead,
so the update is the whole batch's mean over its counted tokens.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lite_tp_jax.core.axes import BATCH_AXES
from lite_tp_jax.core.collectives import deterministic_collectives
from lite_tp_jax.core.errors import BadInput
from lite_tp_jax.layers.moe import ExpertBias
from lite_tp_jax.parallel.grads import clip_by_norm, global_norm
from lite_tp_jax.sharding.rules import param_shardings

LossFn = Callable[[nnx.Module, Any], tuple[jax.Array, dict[str, jax.Array]]]
"""``loss_fn(model, batch) -> (loss, metrics)``: a scalar and a dict of scalars."""


def keep_where_finite(finite: jax.Array, updated: Any, previous: list[jax.Array]) -> Any:
    """``updated`` where ``finite`` (a scalar bool) holds, else ``previous``: under
    ``on_nonfinite: skip`` an update with a non-finite loss, gradient norm or
    resulting parameter is dropped inside the compiled step (a select per
    array, no recompile)."""
    leaves, structure = jax.tree.flatten(updated)
    return jax.tree.unflatten(structure, [jnp.where(finite, new, old) for new, old in zip(leaves, previous, strict=True)])


TRAINED_TOKENS = "trained_tokens"
"""The metric a loss that is a mean over counted tokens reports their number with."""


class TrainStep:
    """``step(batch) -> metrics``: updates ``model`` and ``optimizer`` in place.

    ``grad_clip``: the global norm gradients are clipped to (None: no clipping).
    ``schedule``: the learning rate schedule, reported as the ``lr`` metric.
    The step is compiled once; state buffers are donated so parameters and
    optimizer moments are updated without a second copy in device memory.
    With ``deterministic`` it is traced (and cached) in deterministic
    mode: every reduction in fixed rank order (``collectives.py``).
    """

    def __init__(
        self,
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        loss_fn: LossFn,
        *,
        grad_clip: float | None = None,
        grad_accum: int = 1,
        deterministic: bool = False,
        on_nonfinite: str = "stop",
        schedule: Callable[[jax.Array], jax.Array] | None = None,
        bias_update_rate: float = 0.0,
    ):
        if on_nonfinite not in ("stop", "skip"):
            raise BadInput(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}.")
        if not (isinstance(grad_accum, int) and grad_accum >= 1):
            raise BadInput(f"grad_accum must be a positive integer, got {grad_accum!r}.")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.schedule, self.grad_clip = schedule, grad_clip
        self.grad_accum, self.deterministic = grad_accum, deterministic
        self.drop_nonfinite = on_nonfinite == "skip"
        self.bias_update_rate = bias_update_rate
        self.mesh = mesh = model.mesh
        self.graphdef, state = nnx.split((model, optimizer))
        # The step reads and writes the Variables' arrays as a flat list: walking the
        # module graph (nnx.state / nnx.update) on every call costs milliseconds of Python.
        self._variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        self._structure = jax.tree.structure(state)
        shardings = jax.tree.leaves(param_shardings(state, mesh))
        self._step: Callable = jax.jit(
            self._flat_step,
            in_shardings=(shardings, NamedSharding(mesh, P(BATCH_AXES))),  # a prefix: every batch array's rows
            out_shardings=(shardings, None),
            donate_argnums=0,
        )

    def _flat_step(self, arrays, batch):
        new_state, metrics = self._pure_step(jax.tree.unflatten(self._structure, arrays), batch)
        return jax.tree.leaves(new_state), metrics

    def _pure_step(self, state, batch):
        previous = jax.tree.leaves(state)  # the arrays; merge's Variables are updated in place
        model, optimizer = nnx.merge(self.graphdef, state)
        (loss, metrics), grads = self._loss_and_grads(model, batch)
        load_errors, grads = nnx.split_state(grads, ExpertBias, ...) if self.bias_update_rate else (None, grads)
        grad_norm = global_norm(grads, self.mesh)  # one all-reduce
        lr = None if self.schedule is None else self.schedule(optimizer.step[...])
        optimizer.update(model, grads if self.grad_clip is None else clip_by_norm(grads, grad_norm, self.grad_clip))
        if load_errors is not None:  # auxiliary-loss-free balancing: overloaded experts' biases go down
            biases = nnx.state(model, ExpertBias)
            nnx.update(model, jax.tree.map(lambda b, e: b - self.bias_update_rate * jnp.sign(e), biases, load_errors))
        param_norm = global_norm(nnx.state(model, nnx.Param), self.mesh)  # one all-reduce
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        new_state = nnx.state((model, optimizer))
        if self.drop_nonfinite:
            new_state = keep_where_finite(finite, new_state, previous)
        metrics = {"loss": loss, **metrics, "grad_norm": grad_norm, "param_norm": param_norm,
                   **({} if lr is None else {"lr": lr}), "skipped": (~finite).astype(jnp.float32)}
        return new_state, metrics

    def _loss_and_grads(self, model: nnx.Module, batch: Any):
        """``((loss, metrics), grads)`` of the whole batch, as the mean over
        ``grad_accum`` scanned micro-steps."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params, batch):
            return self.loss_fn(nnx.merge(graphdef, params, rest), batch)

        value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
        k = self.grad_accum
        if k == 1:
            return value_and_grad(params, batch)

        micro_rows = NamedSharding(self.mesh, P(None, BATCH_AXES))

        def micro_steps(rows):  # [B, ...] -> [k, B/k, ...]; step i: rows i, i+k, ... (local on every rank)
            rows = rows.reshape(rows.shape[0] // k, k, *rows.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(rows, micro_rows)

        def accumulate(total, batch):
            (loss, metrics), grads = value_and_grad(params, batch)
            if TRAINED_TOKENS in metrics:  # a mean over counted targets: weighted by the micro-step's count
                n = metrics[TRAINED_TOKENS]
                return jax.tree.map(lambda t, g: t + g * n, total, grads), (loss * n, metrics)
            return jax.tree.map(jnp.add, total, grads), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, params)
        total, (losses, metrics) = jax.lax.scan(accumulate, zeros, jax.tree.map(micro_steps, batch))
        mean = functools.partial(jnp.mean, axis=0)
        if TRAINED_TOKENS in metrics:
            counted = jnp.maximum(metrics[TRAINED_TOKENS].sum(), 1.0)
            metrics = {name: value.sum() if name == TRAINED_TOKENS else value.mean(0) for name, value in metrics.items()}
            return (losses.sum() / counted, metrics), jax.tree.map(lambda g: g / counted, total)
        return (mean(losses), jax.tree.map(mean, metrics)), jax.tree.map(lambda g: g / k, total)

    def _arrays(self) -> list:
        return [variable.get_raw_value() for variable in self._variables]

    def _check(self, batch: Any) -> None:
        ranks = math.prod(self.mesh.shape[axis] for axis in BATCH_AXES) * self.grad_accum
        for leaf in jax.tree.leaves(batch):
            if not leaf.shape or leaf.shape[0] % ranks:
                raise BadInput(
                    f"every batch array needs rows on dim 0 divisible by data x expert x fsdp x grad_accum = {ranks}; "
                    f"got shape {tuple(leaf.shape)}."
                )

    def lower(self, batch: Any):
        """The lowered step (for HLO inspection) without running it."""
        self._check(batch)
        with deterministic_collectives(self.deterministic):
            return self._step.lower(self._arrays(), batch)

    def export(self, batch: Any, *, platforms: tuple[str, ...]) -> jax.export.Exported:
        """The step lowered for ``platforms`` (``"cuda"``, ``"tpu"``, ...) with
        ``jax.export``; no device of those platforms is needed. The MoE exchange's
        ``ragged_all_to_all`` (GPU, TPU) lowers to a custom call that ``jax.export``
        gives no compatibility guarantee for; it is allowed here."""
        allowed = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
        with deterministic_collectives(self.deterministic):
            return jax.export.export(self._step, platforms=platforms, disabled_checks=allowed)(self._arrays(), batch)

    def __call__(self, batch: Any) -> dict[str, jax.Array]:
        self._check(batch)
        with deterministic_collectives(self.deterministic):
            new_arrays, metrics = self._step(self._arrays(), batch)
        for variable, array in zip(self._variables, new_arrays, strict=True):
            variable.set_raw_value(array)
        return metrics
