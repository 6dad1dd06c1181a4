"""One jit-compiled training step: loss, gradients, AdamW update.

Sharding. Parameters and optimizer state keep their PartitionSpecs (the
optimizer's moments carry their parameter's spec); the batch rows are split
over "data" x "expert". The model runs in one region where every axis is
manual: gradients of parameters replicated across a TP group are summed over
"tensor" where the group's partial results meet (``copy_to_tensor_region``
backward), and gradients of parameters replicated across data-parallel ranks
are summed over "data" (and "expert") by the backward of their use on per-rank
rows.
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
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lite_tp_jax.mesh import DATA, EXPERT, PIPELINE
from lite_tp_jax.collectives import deterministic_collectives
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.transformer import Transformer, partition_rules
from lite_tp_jax.parallel.grads import clip_by_norm, global_norm
from lite_tp_jax.plan.rules import batch_spec, param_shardings
from lite_tp_jax.train.config import TrainConfig
from lite_tp_jax.validate import FitError


def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``train.lr``, then cosine decay to ``lr * min_lr_ratio``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.lr,
        warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.lr * train.min_lr_ratio,
    )


def _decay_mask(params: nnx.State) -> Any:
    """Weight decay for matrices (kernels, embeddings), not for norms or biases."""

    def decays(path, _):
        name = getattr(path[-1], "key", getattr(path[-1], "name", ""))
        if name == "value" and len(path) > 1:
            name = getattr(path[-2], "key", "")
        return name in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """AdamW; gradients arrive clipped by their global norm (``TrainStep``)."""
    return optax.adamw(
        learning_rate_schedule(train),
        b1=train.b1,
        b2=train.b2,
        weight_decay=train.weight_decay,
        mask=_decay_mask,
    )


def create_model_and_optimizer(
    model_config: ModelConfig, train: TrainConfig, mesh: Mesh
) -> tuple[Transformer, nnx.Optimizer]:
    """A sharded model (initialised from ``train.seed``, identically for any mesh)
    and its optimizer, whose state is sharded like the parameters. With
    ``train.shard_optimizer`` (ZeRO-1, Megatron's distributed optimizer) the
    parameters, and so the AdamW moments, are stored split over "data": the
    region all-gathers them and reduce-scatters their gradients
    (``PartitionRules.shard_over_data``), and each rank updates its slice."""
    rules = partition_rules(model_config, shard_over_data=train.shard_optimizer)
    model = Transformer(model_config, mesh=mesh, rules=rules, rngs=nnx.Rngs(train.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(train), wrt=nnx.Param)
    state = nnx.state(optimizer)  # step counts start on one device: put them on the mesh, replicated
    nnx.update(optimizer, jax.device_put(state, param_shardings(state, mesh)))
    return model, optimizer


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches ``[global_batch, seq]``: rows split over "data" x "expert"."""
    return NamedSharding(mesh, batch_spec())


def check_grad_accum(train: TrainConfig, mesh: Mesh) -> None:
    """Each rank's rows split into ``grad_accum`` micro-steps, each into the
    pipeline's ``microbatches``; a ``FitError`` naming the fields otherwise."""
    ranks = mesh.shape[DATA] * mesh.shape[EXPERT]
    rows, k = train.global_batch // ranks, train.grad_accum
    if rows % k:
        raise FitError(
            f"{{global_batch}} / (data x expert = {ranks}) rows per rank must be divisible by {{grad_accum}}",
            global_batch=train.global_batch, grad_accum=k,
        )
    if k > 1 and mesh.shape[PIPELINE] > 1 and (rows // k) % train.microbatches:
        raise FitError(
            f"{{global_batch}} / (data x expert = {ranks}) / {{grad_accum}} rows per micro-step "
            f"must be divisible by {{microbatches}}",
            global_batch=train.global_batch, grad_accum=k, microbatches=train.microbatches,
        )

def keep_if_not(finite: jax.Array, updated: Any, previous: list[jax.Array]) -> Any:
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
            new_state = keep_if_not(finite, new_state, previous)
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

    def __call__(self, tokens: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
        with deterministic_collectives(self.deterministic):
            new_arrays, metrics = self._step(self._arrays(), tokens, targets)
        for variable, array in zip(self._variables, new_arrays, strict=True):
            variable.set_raw_value(array)
        return metrics
