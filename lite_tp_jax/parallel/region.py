"""Regions: where one rank's math runs, and the adapter that runs any layer standalone.

Every layer is written once, as one rank's math on its shards (its ``local``
method), with its collectives spelled out. That math runs inside a *region*: a
``jax.shard_map`` over the layer's mesh in which every mesh axis is manual, so
every collective is one the code asks for. The model enters one region for all
its layers (``models/transformer.py``). A layer called from ordinary jit code
enters one for itself: ``ParallelLayer.__call__`` hands the call to
``run_standalone`` with the ``Layout`` the layer declares (how its inputs and
outputs lie over the mesh); no layer writes shard_map specs.

Entering a region (``run_in_region``), each parameter arrives as its shard (the
spec it carries, from the rule table in ``plan/rules.py``), and:

* a parameter replicated over axes that split the token rows ("data", and
  "expert" for non-expert weights) passes through ``copy_to_tensor_region``
  over those axes. Its gradient is summed over them in that function's
  backward: one explicit all-reduce per (stacked) parameter, after the
  layers' backward, where the tensor-parallel sums have already happened
  inside the layers (gradients reduce over "tensor" first, then "data").
* a parameter stored split over "data" (``PartitionRules.shard_over_data``) is
  all-gathered on that dim (``gather_from_sequence_region``; backward: a
  reduce-scatter, which is also its sum over the data-parallel ranks).

So every reduction of a training step goes through ``collectives.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lite_tp_jax.collectives import copy_to_tensor_region, gather_from_sequence_region, gather_from_tensor_region
from lite_tp_jax.mesh import AXES, DATA, TENSOR
from lite_tp_jax.plan.rules import BATCH_AXES, padded_size


def in_region() -> bool:
    """True inside a shard_map where the "tensor" axis is manual."""
    return TENSOR in jax.sharding.get_abstract_mesh().manual_axes


# --- entering a region --------------------------------------------------------


def _names(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _spec(variable: nnx.Variable, manual: frozenset[str]) -> P:
    """The variable's spec restricted to the manual axes (others are automatic)."""

    def keep(entry):
        kept = tuple(name for name in _names(entry) if name in manual)
        return kept[0] if len(kept) == 1 else (kept or None)

    return P(*(keep(entry) for entry in variable.get_metadata().get("out_sharding") or ()))


def _enter_param(value: jax.Array, spec: P, data_dim: int | None, row_axes: tuple[str, ...]) -> jax.Array:
    """One parameter's entry: all-gathered if stored split over "data" (backward:
    reduce-scatter, its sum over "data"); then made per-rank over the row axes it
    is replicated on (backward: all-reduce, its sum over them)."""
    split = {name for entry in spec for name in _names(entry)}
    if data_dim is not None:
        gather = gather_from_sequence_region if DATA in row_axes else gather_from_tensor_region
        value = gather(value, DATA, data_dim)
    replicated_over = tuple(axis for axis in row_axes if axis not in split)
    return copy_to_tensor_region(value, replicated_over) if replicated_over else value


def run_in_region(
    module: nnx.Module | None,
    fn: Callable[..., Any],
    *args: Any,
    mesh: Mesh,
    arg_specs: Sequence[P],
    out_specs: Any,
    row_axes: tuple[str, ...],
    axes: frozenset[str] = frozenset(AXES),
) -> Any:
    """``fn(module, *args)`` (or ``fn(*args)`` without a module) in a shard_map of
    ``mesh`` where ``axes`` are manual. ``row_axes``: the manual axes that split the
    token rows, over which replicated parameters get their gradients summed."""
    if module is None:
        return jax.shard_map(fn, mesh=mesh, in_specs=tuple(arg_specs), out_specs=out_specs, axis_names=set(axes))(*args)
    graphdef, state = nnx.split(module)
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    specs = jax.tree.map(lambda v: _spec(v, axes), state, is_leaf=is_variable)
    data_dims = jax.tree.map(lambda v: v.get_metadata().get("data_dim"), state, is_leaf=is_variable)
    used_rows = tuple(axis for axis in row_axes if mesh.shape[axis] > 1)

    def body(state, *args):
        state = jax.tree.map(
            lambda v, spec, dim: v.replace(_enter_param(v[...], spec, dim, used_rows)),
            state, specs, data_dims, is_leaf=is_variable,
        )
        return fn(nnx.merge(graphdef, state), *args)

    return jax.shard_map(
        body, mesh=mesh, in_specs=(specs, *arg_specs), out_specs=out_specs, axis_names=set(axes)
    )(state, *args)


# --- standalone use: layouts and the generic adapter -----------------------------


@dataclass(frozen=True)
class Activation:
    """How an activation of a standalone layer lies over the mesh.

    ``split``: "replicated" (every tensor rank holds it whole), "sequence"
    (dim -2 split over "tensor"), or "last" (the last dim split over ``axes``:
    padded from ``logical`` on the way in, trimmed to it on the way out).
    ``rows``: dim 0 holds token rows, split over the batch axes that divide it
    (``required`` axes must). ``ndim``: the rank, for a result (``of``).
    """

    split: Literal["replicated", "sequence", "last"] = "replicated"
    logical: int | None = None
    axes: tuple[str, ...] = (TENSOR,)
    rows: bool = True
    ndim: int = 0

    def of(self, ndim: int) -> Activation:
        """This layout for a result of rank ``ndim``."""
        return replace(self, ndim=ndim)


REPLICATED = Activation()
SEQUENCE = Activation("sequence")
STATISTIC = Activation(rows=False)
"""A value reduced over every rank (a scalar statistic)."""


def features(logical: int, axes: tuple[str, ...] = (TENSOR,)) -> Activation:
    """The last dim, ``logical`` long, split over ``axes``."""
    return Activation("last", logical, tuple(axes))


def sequence_parallel(enabled: bool) -> Activation:
    return SEQUENCE if enabled else REPLICATED


@dataclass(frozen=True)
class Layout:
    """A layer method's activations: one ``Activation`` per argument, and a
    pytree of them for the result. ``required``: batch axes the rows must be
    split over (the experts' all-to-all needs rows split over "expert")."""

    inputs: tuple[Activation, ...]
    output: Any
    required: tuple[str, ...] = ()


def _row_axes(mesh: Mesh, rows: int | None, required: tuple[str, ...], name: str) -> tuple[str, ...]:
    chosen: list[str] = []
    for axis in BATCH_AXES:
        size = mesh.shape[axis]
        divides = rows is not None and rows % (math.prod(mesh.shape[a] for a in chosen) * size) == 0
        if axis in required and not divides:
            raise ValueError(
                f"{name} splits the batch over the {axis} axis: batch size {rows} is not "
                f"divisible by the {axis} size {size}."
            )
        if divides and (size > 1 or axis in required):
            chosen.append(axis)
    return tuple(chosen)


def _activation_spec(activation: Activation, ndim: int, row_axes: tuple[str, ...]) -> P:
    entries: list[Any] = [None] * ndim
    if activation.rows and ndim >= 2 and row_axes:
        entries[0] = row_axes
    if activation.split == "sequence":
        entries[-2] = TENSOR
    elif activation.split == "last":
        entries[-1] = activation.axes if len(activation.axes) > 1 else activation.axes[0]
    return P(*entries)


def check_sequence_divisible(x: jax.Array, mesh: Mesh, name: str, dim: int = -2) -> None:
    """The sequence (``dim``, by default -2) of ``x`` must split evenly over "tensor"."""
    tp = mesh.shape[TENSOR]
    if x.ndim < 2 or x.shape[dim] % tp:
        raise ValueError(
            f"{name} with sequence_parallel needs a sequence length (dim -2) divisible by "
            f"the tensor-parallel degree {tp}, got shape {tuple(x.shape)}."
        )


def run_standalone(module: nnx.Module | None, fn: Callable[..., Any], layout: Layout, *args: Any, mesh: Mesh, name: str) -> Any:
    """Runs one rank's math ``fn`` from ordinary jit code: lays ``args`` out as
    ``layout.inputs`` say (padding split last dims), enters a region with every
    axis manual, and returns the results in their logical shapes."""
    first = next((x for x, a in zip(args, layout.inputs) if a.rows and jnp.ndim(x) >= 2), None)
    row_axes = _row_axes(mesh, None if first is None else first.shape[0], layout.required, name)
    arg_specs, laid_out = [], []
    for x, activation in zip(args, layout.inputs):
        if activation.split == "sequence":
            check_sequence_divisible(x, mesh, name)
        elif activation.split == "last":
            padding = padded_size(activation.logical, math.prod(mesh.shape[a] for a in activation.axes)) - x.shape[-1]
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padding)]) if padding else x
        arg_specs.append(_activation_spec(activation, jnp.ndim(x), row_axes))
        laid_out.append(x)

    is_activation = lambda a: isinstance(a, Activation)  # noqa: E731
    for activation in jax.tree.leaves(layout.output, is_leaf=is_activation):
        if activation.split == "sequence" and first is not None:  # its sequence is the input's
            check_sequence_divisible(first, mesh, name, dim=activation.ndim - 2)
    out_specs = jax.tree.map(lambda a: _activation_spec(a, a.ndim, row_axes), layout.output, is_leaf=is_activation)
    result = run_in_region(
        module, fn, *laid_out,
        mesh=mesh, arg_specs=arg_specs, out_specs=out_specs, row_axes=row_axes,
    )

    def trim(activation, y):
        return y[..., : activation.logical] if activation.split == "last" else y

    return jax.tree.map(trim, layout.output, result, is_leaf=is_activation)


class ParallelLayer(nnx.Module):
    """Base of every parallel layer: ``local`` is one rank's math. Calling the
    layer runs ``local`` directly inside a region, or, from ordinary jit code,
    through ``run_standalone`` with the activations' ``layout``."""

    mesh: Mesh

    def layout(self, *args: Any) -> Layout:
        """How ``local``'s arguments and result lie over the mesh."""
        raise NotImplementedError

    def local(self, *args: Any) -> Any:
        """One rank's math on its shards."""
        raise NotImplementedError

    def check(self, *args: Any) -> None:
        """Input checks that hold in and out of a region (shapes, dtypes)."""

    def standalone(self, *args: Any) -> Any:
        """What a standalone call runs in its region: ``local``, unless a layer
        must finish what a model would (MoE turns row sums into batch means)."""
        return self.local(*args)

    def __call__(self, *args: Any) -> Any:
        self.check(*args)
        if in_region():
            return self.local(*args)
        return run_standalone(self, type(self).standalone, self.layout(*args), *args, mesh=self.mesh, name=type(self).__name__)

    def run(self, method: Callable[..., Any], layout: Layout, *args: Any) -> Any:
        """``method(self, *args)``: here inside a region, else in one entered for it."""
        if in_region():
            return method(self, *args)
        return run_standalone(self, method, layout, *args, mesh=self.mesh, name=type(self).__name__)
