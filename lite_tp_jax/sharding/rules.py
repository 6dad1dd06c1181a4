"""Parameters and activations laid out by the rule table (``table.py``).

Every PartitionSpec in lite_tp_jax is read from here: the layers create their
parameters through ``PartitionRules.param``, pipeline stacking adds the
"stacked" strategy's axes (``PartitionRules.stack``), checkpoints and
``export_state`` read the specs the parameters carry, and the planner prints
the table as applied. Nothing else states a parameter's sharding.

With an "fsdp" axis > 1 the table splits each matrix over it too (padded like
any split dim); ``parallel/fsdp.py`` gathers them back where they are used.

Activations: token rows (the batch) are split over ``BATCH_AXES``
(``batch_spec``); with sequence parallelism the sequence is split over "tensor".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lite_tp_jax.core.axes import BATCH_AXES, FSDP, PIPELINE, TENSOR, entry_axes, spec_entry
from lite_tp_jax.sharding.table import MEGATRON_RULES, STRATEGIES, VOCAB, check_overrides, strategy_of

Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]


def padded_size(size: int, parts: int) -> int:
    """Smallest multiple of ``parts`` that is >= ``size``."""
    return -(-size // parts) * parts


def axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
    """Number of ranks of ``axes`` taken together."""
    return math.prod(mesh.shape[axis] for axis in axes)


def vocab_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes the vocabulary is split over: no pipeline stage holds a whole table."""
    return (PIPELINE, TENSOR) if mesh.shape[PIPELINE] > 1 else (TENSOR,)


@partial(jax.jit, static_argnames=("init", "shape", "padded_shape", "dtype", "sharding"))
def _init_padded(key, *, init, shape, padded_shape, dtype, sharding):
    value = init(key, shape, dtype)
    value = jnp.pad(value, [(0, p - s) for s, p in zip(shape, padded_shape)])
    return jax.lax.with_sharding_constraint(value, sharding)


@dataclass(frozen=True)
class PartitionRules:
    """The rule table: ``overrides`` (``{role pattern: strategy}``) before Megatron's defaults."""

    overrides: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        check_overrides(self.overrides, builtin_only=False)  # user models name roles of their own

    @property
    def rules(self) -> tuple[tuple[str, str], ...]:
        return (*self.overrides.items(), *MEGATRON_RULES)

    def strategy(self, role: str, supports: tuple[str, ...] = ()) -> str:
        """``role``'s strategy (``table.strategy_of``); ``supports``: those its layer is written for."""
        return strategy_of(role, self.overrides, supports)

    def split_axes(self, strategy: str, dim: str, mesh: Mesh) -> tuple[str, ...]:
        """The mesh axes that dim role ``dim`` is split over under ``strategy``."""
        axes = STRATEGIES[strategy].get(dim, ())
        if axes == VOCAB:
            return vocab_axes(mesh)
        return tuple(axis for axis in axes if axis != FSDP or mesh.shape.get(FSDP, 1) > 1)

    def spec(self, strategy: str, dims: Sequence[str | None], mesh: Mesh) -> P:
        """The PartitionSpec under ``strategy`` of a parameter whose dims play the parts ``dims``."""
        return P(*(spec_entry(self.split_axes(strategy, dim, mesh)) if dim else None for dim in dims))

    def param(
        self,
        role: str,
        init: Initializer,
        key: jax.Array,
        shape: Sequence[int],
        dims: Sequence[str | None],
        mesh: Mesh,
        *,
        padded_shape: Sequence[int] | None = None,
        dtype: Any = jnp.float32,
        strategy: str | None = None,
        supports: tuple[str, ...] = (),
    ) -> nnx.Param:
        """An ``nnx.Param`` of logical ``shape``, stored padded and sharded by the table.

        Each split dim is padded at its end to a multiple of its ranks (or to
        ``padded_shape``, when the layer pads in larger units). Values are drawn
        for the logical shape, so they do not depend on the mesh; each device
        computes only its own shard. Metadata: ``out_sharding`` (the stored
        spec), ``role``, ``strategy``, ``logical_shape`` and ``mesh``.
        ``strategy`` replaces the table's where the math forces it (k/v
        replicated when there are fewer kv heads than TP ranks). ``supports``:
        the strategies the layer's math is written for, the first its own (a
        role no rule matches takes it; a rule giving another is a RuleError).
        """
        shape = tuple(int(s) for s in shape)
        strategy = strategy or self.strategy(role, supports)
        spec = tuple(self.spec(strategy, dims, mesh))
        if padded_shape is None:
            padded_shape = tuple(
                padded_size(size, axes_size(mesh, entry_axes(entry))) for size, entry in zip(shape, spec)
            )
        # a dim the layer pads in its own units is padded further where "fsdp" splits it too
        padded_shape = tuple(padded_size(int(s), axes_size(mesh, entry_axes(e))) for s, e in zip(padded_shape, spec))
        spec = _strip(spec)
        value = _init_padded(
            key, init=init, shape=shape, padded_shape=padded_shape, dtype=jnp.dtype(dtype),
            sharding=NamedSharding(mesh, P(*spec)),
        )
        return nnx.Param(
            value, out_sharding=spec, mesh=mesh, logical_shape=shape, role=role,
            strategy=strategy, eager_sharding=False,
        )

    def stack(
        self, inner: Sequence[Any], stacked_shape: Sequence[int], mesh: Mesh, *, pipelined: bool = True
    ) -> tuple:
        """The spec of a layer parameter with spec ``inner`` once the layer groups
        are stacked in front of it, ``[virtual_stages, groups / v, ...]`` (the
        "stacked" strategy), or ``[count, ...]`` unsplit when not ``pipelined``."""
        stages = self.split_axes(self.strategy("layers"), "stages", mesh) if pipelined else ()
        stacking = (None, *stages)
        inner = tuple(inner) + (None,) * (len(stacked_shape) - len(stacking) - len(inner))
        return _strip((*stacking, *inner))

    def describe(self) -> list[tuple[str, str, dict]]:
        """The table as applied: (role pattern, strategy, {dim role: mesh axes})."""
        return [(pattern, strategy, dict(STRATEGIES[strategy])) for pattern, strategy in self.rules]


def _strip(spec: tuple) -> tuple:
    """``spec``, or ``()`` when it splits nothing."""
    return tuple(spec) if any(entry is not None for entry in spec) else ()


MEGATRON = PartitionRules()
"""The default table."""


def batch_spec(ndim: int = 2) -> P:
    """Token batches ``[rows, ...]``: rows split over the batch axes ("data" x "expert" x "fsdp")."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches ``[global_batch, seq]`` on ``mesh``: rows split over the batch axes."""
    return NamedSharding(mesh, batch_spec())


def param_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """NamedShardings of every variable in ``state``, from the spec it carries."""

    def sharding_of(variable):
        return NamedSharding(mesh, P(*(variable.get_metadata().get("out_sharding") or ())))

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
