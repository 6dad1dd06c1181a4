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
(padding is zero, so it adds nothing): each device sums its shard's squares and
``collectives.all_reduce`` adds them over the axes that split the parameter,
so in deterministic mode the norm, too, is summed in fixed rank order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lite_tp_jax.collectives import all_reduce, deterministic_collectives
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.transformer import BATCH_AXES, Transformer
from lite_tp_jax.train.config import TrainConfig


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


Norm = Callable[[Any], jax.Array]


def sharded_global_norm(model: nnx.Module) -> Norm:
    """``norm(tree)``: the L2 norm of a tree shaped like ``model``'s parameters
    (as ``nnx.Optimizer`` passes gradients), from per-device sums of squares
    all-reduced over the mesh axes that split each parameter."""
    mesh = model.mesh
    params = nnx.state(model, nnx.Param)
    specs = nnx.as_pure(jax.tree.map(lambda v: P(*(v.get_metadata().get("out_sharding") or ())), params,
                                     is_leaf=lambda x: isinstance(x, nnx.Variable)))

    def sum_of_squares(tree):
        total = jnp.zeros((), jnp.float32)
        for x, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs)):
            axes = tuple(name for entry in spec if entry for name in ((entry,) if isinstance(entry, str) else entry))
            local = jnp.sum(jnp.square(x.astype(jnp.float32)))
            total = total + (all_reduce(local, axes) if axes else local)
        return total

    def norm(tree):
        return jnp.sqrt(jax.shard_map(sum_of_squares, mesh=mesh, in_specs=(specs,), out_specs=P())(tree))

    return norm


def clip_by_global_norm(max_norm: float, norm: Norm = optax.tree.norm) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` (same formula, same empty state) with the norm given."""

    def update(updates, state, params=None):
        g_norm = norm(updates)
        scale = lambda t: jax.lax.select(g_norm < max_norm, t, (t / g_norm.astype(t.dtype)) * max_norm)  # noqa: E731
        return jax.tree.map(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train: TrainConfig, norm: Norm = optax.tree.norm) -> optax.GradientTransformation:
    return optax.chain(
        clip_by_global_norm(train.grad_clip, norm),
        optax.adamw(
            learning_rate_schedule(train),
            b1=train.b1,
            b2=train.b2,
            weight_decay=train.weight_decay,
            mask=_decay_mask,
        ),
    )


def create_model_and_optimizer(
    model_config: ModelConfig, train: TrainConfig, mesh: Mesh
) -> tuple[Transformer, nnx.Optimizer]:
    """A sharded model (initialised from ``train.seed``, identically for any mesh)
    and its optimizer, whose state is sharded like the parameters."""
    model = Transformer(model_config, mesh=mesh, rngs=nnx.Rngs(train.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(train, sharded_global_norm(model)), wrt=nnx.Param)
    return model, optimizer


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """NamedShardings of every variable in ``state`` from its ``out_sharding`` metadata."""

    def sharding_of(variable):
        return NamedSharding(mesh, P(*(variable.get_metadata().get("out_sharding") or ())))

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches ``[global_batch, seq]``: rows split over "data" x "expert"."""
    return NamedSharding(mesh, P(BATCH_AXES))


class TrainStep:
    """``step(tokens, targets) -> metrics``: updates ``model`` and ``optimizer`` in place.

    The step is compiled once; state buffers are donated so parameters and
    optimizer moments are updated without a second copy in device memory.
    With ``train.deterministic`` it is traced in deterministic-collectives mode
    (every reduction in fixed rank order, see ``collectives.py``).
    """

    def __init__(self, model: Transformer, optimizer: nnx.Optimizer, train: TrainConfig):
        self.model, self.optimizer = model, optimizer
        self.schedule = learning_rate_schedule(train)
        self.microbatches = train.microbatches
        self.deterministic = train.deterministic
        mesh = model.mesh
        self.norm = sharded_global_norm(model)
        self.graphdef, state = nnx.split((model, optimizer))
        shardings = state_shardings(state, mesh)
        self._step: Callable = jax.jit(
            self._pure_step,
            in_shardings=(shardings, batch_sharding(mesh), batch_sharding(mesh)),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )

    def _pure_step(self, state, tokens, targets):
        model, optimizer = nnx.merge(self.graphdef, state)
        def loss_fn(model):
            return model.loss(tokens, targets, self.microbatches)

        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        lr = self.schedule(optimizer.step[...])
        optimizer.update(model, grads)
        metrics = {"loss": loss, **metrics, "grad_norm": self.norm(nnx.as_pure(grads)), "lr": lr}
        return nnx.state((model, optimizer)), metrics

    def lower(self, tokens: jax.Array, targets: jax.Array):
        """The lowered step (for HLO inspection) without running it."""
        with deterministic_collectives(self.deterministic):
            return self._step.lower(nnx.state((self.model, self.optimizer)), tokens, targets)

    def __call__(self, tokens: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
        state = nnx.state((self.model, self.optimizer))
        with deterministic_collectives(self.deterministic):
            new_state, metrics = self._step(state, tokens, targets)
        nnx.update((self.model, self.optimizer), new_state)
        return metrics
