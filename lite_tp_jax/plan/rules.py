"""The partitioning rule table: which mesh axes every parameter and activation is split over.

Every PartitionSpec in lite_tp_jax is read from here: the layers create their
parameters through ``PartitionRules.param``, pipeline stacking adds the
"stacked" strategy's axes, checkpoints and ``export_state`` read the specs the
parameters carry, and the planner prints the table as applied. Nothing else
states a sharding.

A parameter has a *role* (``"attention.query"``, ``"mlp.down"``, ...) and names
the part each of its dims plays (``"in"``, ``"out"``, ``"vocab"``,
``"experts"``; None for a dim that is never split). The first rule whose
pattern (``fnmatch``) matches the role gives the *strategy*, and the strategy
says which dims are split over which mesh axes. Megatron-LM's defaults::

    role                     strategy        split
    embedding, head          vocab           vocab over ("pipeline", "tensor") (pipeline only when > 1)
    attention.query          column          out (heads) over "tensor"
    attention.key / .value   column          out (kv heads) over "tensor"; replicated when kv heads < TP
    attention.out            row             in (heads) over "tensor"
    mlp.gate, mlp.up         column          out (hidden) over "tensor"
    mlp.down                 row             in (hidden) over "tensor"
    moe.router               replicated      -
    moe.gate, moe.up         expert-column   experts over "expert", out (hidden) over "tensor"
    moe.down                 expert-row      experts over "expert", in (hidden) over "tensor"
    *norm                    replicated      -
    positions                replicated      -   (learned positions, GPT-2)
    column / row             column / row    standalone ColumnParallelLinear / RowParallelLinear
    layers                   stacked         stacked layer groups [virtual_stages, groups/v] over "pipeline"

(Megatron's names: a "column" split is the spec's "row partitioning" and vice
versa; see the README.) A bias has its kernel's role: a column bias is split
with the outputs, a row bias is replicated and added once after the reduction.

Overrides (``model.partition_rules`` in a config, ``{role pattern: strategy}``)
take precedence over the defaults. A layer supports only the strategies its math
is written for (``SUPPORTED``); anything else is a one-sentence error.
``shard_over_data`` additionally stores every parameter split over "data" on
its first dim that divides (ZeRO: optimizer state follows its parameter); the
model all-gathers such parameters when it enters its region and reduce-scatters
their gradients (``collectives.gather_from_sequence_region`` on that dim).

Activations: token rows (the batch) are split over ``BATCH_AXES``; with
sequence parallelism the sequence is split over "tensor".
"""

from __future__ import annotations

import fnmatch
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

from lite_tp_jax.mesh import DATA, EXPERT, PIPELINE, TENSOR

Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]

BATCH_AXES = (DATA, EXPERT)
"""The mesh axes that split token rows (data parallelism; expert ranks hold other rows too)."""

VOCAB = "vocab axes"
"""Placeholder for the vocabulary's axes: ("pipeline", "tensor") when pipeline > 1, else ("tensor",)."""

STRATEGIES: dict[str, dict[str, tuple[str, ...] | str]] = {
    "column": {"out": (TENSOR,)},
    "row": {"in": (TENSOR,)},
    "vocab": {"vocab": VOCAB},
    "expert-column": {"experts": (EXPERT,), "out": (TENSOR,)},
    "expert-row": {"experts": (EXPERT,), "in": (TENSOR,)},
    "replicated": {},
    "stacked": {"stages": (PIPELINE,)},
}
"""Strategy -> {dim role: mesh axes}."""

MEGATRON_RULES: tuple[tuple[str, str], ...] = (
    ("embedding", "vocab"),
    ("head", "vocab"),
    ("attention.query", "column"),
    ("attention.key", "column"),
    ("attention.value", "column"),
    ("attention.out", "row"),
    ("mlp.gate", "column"),
    ("mlp.up", "column"),
    ("mlp.down", "row"),
    ("moe.router", "replicated"),
    ("moe.gate", "expert-column"),
    ("moe.up", "expert-column"),
    ("moe.down", "expert-row"),
    ("*norm", "replicated"),
    ("positions", "replicated"),
    ("column", "column"),
    ("row", "row"),
    ("layers", "stacked"),
)
"""(role pattern, strategy), first match wins."""

SUPPORTED: dict[str, frozenset[str]] = {
    "attention.key": frozenset({"column", "replicated"}),
    "attention.value": frozenset({"column", "replicated"}),
}
"""Roles whose layer math supports more than its default strategy."""


def padded_size(size: int, parts: int) -> int:
    """Smallest multiple of ``parts`` that is >= ``size``."""
    return -(-size // parts) * parts


def axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
    """Number of ranks of ``axes`` taken together."""
    return math.prod(mesh.shape[axis] for axis in axes)


def vocab_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes the vocabulary is split over: no pipeline stage holds a whole table."""
    return (PIPELINE, TENSOR) if mesh.shape[PIPELINE] > 1 else (TENSOR,)


def _entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    return None if not axes else axes[0] if len(axes) == 1 else axes


@partial(jax.jit, static_argnames=("init", "shape", "padded_shape", "dtype", "sharding"))
def _init_padded(key, *, init, shape, padded_shape, dtype, sharding):
    value = init(key, shape, dtype)
    value = jnp.pad(value, [(0, p - s) for s, p in zip(shape, padded_shape)])
    return jax.lax.with_sharding_constraint(value, sharding)


@dataclass(frozen=True)
class PartitionRules:
    """The rule table: ``overrides`` (``{role pattern: strategy}``) before Megatron's defaults."""

    overrides: Mapping[str, str] = field(default_factory=dict)
    shard_over_data: bool = False

    def __post_init__(self):
        for pattern, strategy in self.overrides.items():
            if strategy not in STRATEGIES:
                raise ValueError(
                    f"partition rule {pattern!r}: unknown strategy {strategy!r}; "
                    f"choose one of {', '.join(STRATEGIES)}."
                )
            roles = [role for role, _ in MEGATRON_RULES if fnmatch.fnmatchcase(role, pattern)]
            if not roles:
                raise ValueError(
                    f"partition rule {pattern!r} matches no role; roles are "
                    f"{', '.join(role for role, _ in MEGATRON_RULES)}."
                )
            for role in roles:
                allowed = SUPPORTED.get(role, frozenset({self._default(role)}))
                if strategy not in allowed:
                    raise ValueError(
                        f"partition rule {pattern!r}: {role!r} cannot be {strategy!r}; "
                        f"its layer supports {', '.join(sorted(allowed))}."
                    )

    @property
    def rules(self) -> tuple[tuple[str, str], ...]:
        return (*self.overrides.items(), *MEGATRON_RULES)

    @staticmethod
    def _default(role: str) -> str:
        return next(s for pattern, s in MEGATRON_RULES if fnmatch.fnmatchcase(role, pattern))

    def strategy(self, role: str) -> str:
        for pattern, strategy in self.rules:
            if fnmatch.fnmatchcase(role, pattern):
                return strategy
        raise KeyError(f"no partition rule matches role {role!r}; add one to MEGATRON_RULES.")

    def split_axes(self, strategy: str, dim: str, mesh: Mesh) -> tuple[str, ...]:
        """The mesh axes that dim role ``dim`` is split over under ``strategy``."""
        axes = STRATEGIES[strategy].get(dim, ())
        return vocab_axes(mesh) if axes == VOCAB else axes

    def spec(self, strategy: str, dims: Sequence[str | None], mesh: Mesh) -> P:
        """The PartitionSpec under ``strategy`` of a parameter whose dims play the parts ``dims``."""
        return P(*(_entry(self.split_axes(strategy, dim, mesh)) if dim else None for dim in dims))

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
    ) -> nnx.Param:
        """An ``nnx.Param`` of logical ``shape``, stored padded and sharded by the table.

        Each split dim is padded at its end to a multiple of its ranks (or to
        ``padded_shape``, when the layer pads in larger units). Values are drawn
        for the logical shape, so they do not depend on the mesh; each device
        computes only its own shard. Metadata: ``out_sharding`` (the stored
        spec), ``role``, ``strategy``, ``logical_shape``, ``mesh`` and
        ``data_dim`` (the dim split over "data" with ``shard_over_data``).
        ``strategy`` replaces the table's where the math forces it (k/v
        replicated when there are fewer kv heads than TP ranks).
        """
        shape = tuple(int(s) for s in shape)
        strategy = strategy or self.strategy(role)
        spec = tuple(self.spec(strategy, dims, mesh))
        if padded_shape is None:
            padded_shape = tuple(
                padded_size(size, axes_size(mesh, _names(entry))) for size, entry in zip(shape, spec)
            )
        padded_shape = tuple(int(s) for s in padded_shape)
        spec, data_dim = self._over_data(spec, padded_shape, mesh)
        spec = _strip(spec)
        value = _init_padded(
            key, init=init, shape=shape, padded_shape=padded_shape, dtype=jnp.dtype(dtype),
            sharding=NamedSharding(mesh, P(*spec)),
        )
        return nnx.Param(
            value, out_sharding=spec, mesh=mesh, logical_shape=shape, role=role,
            strategy=strategy, data_dim=data_dim, eager_sharding=False,
        )

    def _over_data(self, spec: tuple, shape: Sequence[int], mesh: Mesh, skip: int = 0) -> tuple[tuple, int | None]:
        """``spec`` with "data" added to its first dim (from ``skip``) that divides, for ``shard_over_data``."""
        data = mesh.shape[DATA]
        if not self.shard_over_data or data == 1:
            return spec, None
        for dim in range(skip, len(shape)):
            names = _names(spec[dim])
            if shape[dim] % (axes_size(mesh, names) * data) == 0:
                entry = _entry((*names, DATA))
                return (*spec[:dim], entry, *spec[dim + 1:]), dim
        return spec, None

    def stack(self, inner: Sequence[Any], stacked_shape: Sequence[int], mesh: Mesh) -> tuple[tuple, int | None]:
        """The spec (and data dim) of a layer parameter with spec ``inner`` once the
        layer groups are stacked in front of it, ``[virtual_stages, groups / v, ...]``
        (the "stacked" strategy; with ``shard_over_data`` the data dim is chosen anew)."""
        stacking = (None, *self.split_axes(self.strategy("layers"), "stages", mesh))
        inner = tuple(inner) + (None,) * (len(stacked_shape) - len(stacking) - len(inner))
        inner = tuple(_entry(tuple(n for n in _names(e) if n != DATA)) for e in inner)
        spec, data_dim = self._over_data((*stacking, *inner), stacked_shape, mesh, skip=len(stacking))
        return _strip(spec), data_dim

    def describe(self) -> list[tuple[str, str, dict]]:
        """The table as applied: (role pattern, strategy, {dim role: mesh axes})."""
        return [(pattern, strategy, dict(STRATEGIES[strategy])) for pattern, strategy in self.rules]


def _strip(spec: tuple) -> tuple:
    """``spec``, or ``()`` when it splits nothing."""
    return tuple(spec) if any(entry is not None for entry in spec) else ()


def _names(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


MEGATRON = PartitionRules()
"""The default table."""


def batch_spec(ndim: int = 2) -> P:
    """Token batches ``[rows, ...]``: rows split over "data" x "expert"."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def param_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """NamedShardings of every variable in ``state``, from the spec it carries."""

    def sharding_of(variable):
        return NamedSharding(mesh, P(*(variable.get_metadata().get("out_sharding") or ())))

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
