"""Regions: where one rank's math runs, and the adapter that runs any layer standalone.

Every layer is written once, as one rank's math on its shards (its ``local``
method), with its collectives spelled out. That math runs inside a *region*: a
``jax.shard_map`` over the layer's mesh in which every mesh axis is manual, so
every collective is one the code asks for. A model (the decoder, or a user's
own ``nnx.Module`` of the layers) enters one region for all its layers: a
method marked ``@region`` (bottom of this file). A layer called from ordinary jit code
enters one for itself: ``ParallelLayer.__call__`` hands the call to
``run_standalone`` with the ``Layout`` the layer declares (a ``Placement`` of
each input and output over the mesh); no layer writes shard_map specs.

Entering a region (``run_in_region``), each parameter arrives as its shard (the
spec it carries, from the rule table, ``sharding/rules.py``), and:

* a parameter replicated over axes that split the token rows ("data", and
  "expert" for non-expert weights) passes through ``broadcast_over`` those
  axes. Its gradient is summed over them in that function's backward: one
  explicit all-reduce per (stacked) parameter, after the layers' backward,
  where the tensor-parallel sums have already happened inside the layers
  (gradients reduce over "tensor" first, then "data").
* a parameter stored split over "fsdp" (``parallel/fsdp.py``) is all-gathered
  over it here, unless it belongs to the stacked layer groups, whose shards
  the layer scan gathers one group at a time (backward: a reduce-scatter, which
  is also its sum over the fsdp ranks).

So every reduction of a training step goes through ``core/collectives.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lite_tp_jax.core.axes import AXES, BATCH_AXES, CONTEXT, FSDP, TENSOR, entry_axes, spec_entry
from lite_tp_jax.core.collectives import (
    broadcast_over,
    sum_over,
)
from lite_tp_jax.core.errors import BadInput, FitError
from lite_tp_jax.parallel.context import check_context_split, sequence_order
from lite_tp_jax.parallel.fsdp import gather_variable
from lite_tp_jax.sharding.rules import padded_size


def in_region() -> bool:
    """True inside a shard_map where the "tensor" axis is manual."""
    return TENSOR in jax.sharding.get_abstract_mesh().manual_axes


# --- entering a region --------------------------------------------------------


def _spec(variable: nnx.Variable, manual: frozenset[str]) -> P:
    """The variable's spec restricted to the manual axes (others are automatic)."""

    def keep(entry):
        kept = tuple(name for name in entry_axes(entry) if name in manual)
        return kept[0] if len(kept) == 1 else (kept or None)

    return P(*(keep(entry) for entry in variable.get_metadata().get("out_sharding") or ()))


def _enter_param(variable: nnx.Variable, spec: P, row_axes: tuple[str, ...]) -> jax.Array:
    """One parameter's entry: made per-rank over the row axes it is replicated on
    (backward: all-reduce, its sum over them); then, if stored split over "fsdp"
    and not a scanned layer group's, all-gathered over it (backward:
    reduce-scatter, its sum over "fsdp")."""
    split = {name for entry in spec for name in entry_axes(entry)}
    replicated_over = tuple(axis for axis in row_axes if axis not in split)
    value = broadcast_over(variable[...], replicated_over) if replicated_over else variable[...]
    if variable.get_metadata().get("scanned"):
        return value  # gathered per group inside the layer scan (models/stack.py)
    return gather_variable(variable, value, per_rank=FSDP in row_axes)


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
    is_variable = lambda x: isinstance(x, nnx.Variable)
    specs = jax.tree.map(lambda v: _spec(v, axes), state, is_leaf=is_variable)
    used_rows = tuple(axis for axis in row_axes if mesh.shape[axis] > 1)

    def body(state, *args):
        state = jax.tree.map(
            lambda v, spec: v.replace(_enter_param(v, spec, used_rows)), state, specs, is_leaf=is_variable,
        )
        return fn(nnx.merge(graphdef, state), *args)

    return jax.shard_map(
        body, mesh=mesh, in_specs=(specs, *arg_specs), out_specs=out_specs, axis_names=set(axes)
    )(state, *args)


# --- standalone use: layouts and the generic adapter -----------------------------


@dataclass(frozen=True)
class Placement:
    """How an activation of a standalone layer lies over the mesh.

    ``split``: "replicated" (every tensor rank holds it whole), "sequence"
    (dim -2 split over "tensor"), or "last" (the last dim split over ``axes``:
    padded from ``logical`` on the way in, trimmed to it on the way out).
    ``rows``: dim 0 holds token rows, split over the batch axes that divide it
    (``required`` axes must). ``ndim``: the rank, for a result (``of``).
    ``seq``: the dim holding the sequence (-2 for activations ``[B, S, F]``, -1
    for ids ``[B, S]``, ``TOKENS``), split over "context" on a mesh with
    context > 1, in the order of ``parallel/context.py``; never dim 0 (the rows).
    """

    split: Literal["replicated", "sequence", "last"] = "replicated"
    logical: int | None = None
    axes: tuple[str, ...] = (TENSOR,)
    rows: bool = True
    ndim: int = 0
    seq: int | None = -2

    def of(self, ndim: int) -> Placement:
        """This layout for a result of rank ``ndim``."""
        return replace(self, ndim=ndim)


REPLICATED = Placement()
SEQUENCE = Placement("sequence")
TOKENS = Placement(seq=-1)
"""``[batch, seq]`` ids (tokens, targets, segment ids), whole on every tensor rank."""
STATISTIC = Placement(rows=False)
"""A value reduced over every rank (a scalar statistic)."""


def features(logical: int, axes: tuple[str, ...] = (TENSOR,)) -> Placement:
    """The last dim, ``logical`` long, split over ``axes``."""
    return Placement("last", logical, tuple(axes))


def sequence_or_replicated(sequence_parallel: bool) -> Placement:
    """Between blocks: split along the sequence with sequence parallelism, else replicated over "tensor"."""
    return SEQUENCE if sequence_parallel else REPLICATED


@dataclass(frozen=True)
class Layout:
    """A layer method's activations: one ``Placement`` per argument, and a
    pytree of them for the result. ``required``: batch axes the rows must be
    split over (the experts' all-to-all needs rows split over "expert")."""

    inputs: tuple[Placement, ...]
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


def context_dim(placement: Placement, ndim: int) -> int | None:
    """The dim of an array of rank ``ndim`` laid out as ``placement`` that is split
    over "context" on a context mesh (its sequence), or None."""
    if placement.seq is None or ndim < 2 or placement.seq % ndim == 0:
        return None
    return placement.seq % ndim


def _placement_spec(placement: Placement, ndim: int, row_axes: tuple[str, ...], context: bool = False) -> P:
    entries: list[Any] = [None] * ndim
    if placement.rows and ndim >= 2 and row_axes:
        entries[0] = row_axes
    if placement.split == "sequence":
        entries[-2] = TENSOR
    elif placement.split == "last":
        entries[-1] = placement.axes if len(placement.axes) > 1 else placement.axes[0]
    dim = context_dim(placement, ndim) if context else None
    if dim is not None:  # the sequence over ("context", "tensor"): each context rank's slots split again
        entries[dim] = spec_entry((CONTEXT, *entry_axes(entries[dim])))
    return P(*entries)


def check_sequence_split(seq_len: int, tensor: int, owner: str = "", context: int = 1) -> None:
    """With sequence parallelism the sequence splits evenly over "tensor" (and
    "context"): a ``FitError`` naming ``seq_len`` and ``tensor``; ``owner`` prefixes it."""
    if seq_len % (tensor * context):
        over = "{tensor}" if context == 1 else "{tensor} x {context}"
        raise FitError(
            f"{owner}{{seq_len}} must be divisible by {over} with {{sequence_parallel}}",
            seq_len=seq_len, tensor=tensor, context=context, sequence_parallel=True,
        )


def _check_sequence(x: jax.Array, mesh: Mesh, name: str, dim: int = -2) -> None:
    """The sequence (``dim``, by default -2) of a standalone layer's ``x`` splits evenly over "tensor" x "context"."""
    if x.ndim < 2:
        raise ValueError(f"{name} with sequence_parallel needs a sequence dim (-2), got shape {tuple(x.shape)}.")
    check_sequence_split(x.shape[dim], mesh.shape[TENSOR], f"{name}: the sequence length ", mesh.shape[CONTEXT])


def _context_permute(x: jax.Array, dim: int, mesh: Mesh, balanced: bool, name: str) -> jax.Array:
    """``x``'s sequence (``dim``, natural order) in the order it lies over "context"
    (``parallel/context.py``), checked to split evenly; outside the region, so each
    rank's shard is its slots."""
    check_context_split(x.shape[dim], mesh.shape[CONTEXT], balanced, owner=f"{name}: the sequence length ")
    return jnp.take(x, jnp.asarray(sequence_order(x.shape[dim], mesh.shape[CONTEXT], balanced)), axis=dim)


def _context_unpermute(y: jax.Array, dim: int, mesh: Mesh, balanced: bool) -> jax.Array:
    """A result's sequence (``dim``) back in its natural order."""
    order = sequence_order(y.shape[dim], mesh.shape[CONTEXT], balanced)
    return jnp.take(y, jnp.asarray(np.argsort(order)), axis=dim)


def token_axes(mesh: Mesh, row_axes: tuple[str, ...]) -> tuple[str, ...]:
    """The axes that split a region's tokens: ``row_axes`` and "context" (size > 1).
    Parameters replicated over them get their gradients summed over them."""
    return (*row_axes, CONTEXT) if mesh.shape[CONTEXT] > 1 else row_axes


def run_standalone(module: nnx.Module | None, fn: Callable[..., Any], layout: Layout, *args: Any, mesh: Mesh, name: str) -> Any:
    """Runs one rank's math ``fn`` from ordinary jit code: lays ``args`` out as
    ``layout.inputs`` say (padding split last dims; on a context mesh, the
    sequence permuted as it lies over "context"), enters a region with every
    axis manual, and returns the results in their logical shapes and order."""
    first = next((x for x, a in zip(args, layout.inputs) if a.rows and jnp.ndim(x) >= 2), None)
    row_axes = _row_axes(mesh, None if first is None else first.shape[0], layout.required, name)
    context = mesh.shape[CONTEXT] > 1
    balanced = getattr(module, "context_balance", True)
    arg_specs, laid_out = [], []
    for x, placement in zip(args, layout.inputs):
        if placement.split == "sequence":
            _check_sequence(x, mesh, name)
        elif placement.split == "last":
            padding = padded_size(placement.logical, math.prod(mesh.shape[a] for a in placement.axes)) - x.shape[-1]
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padding)]) if padding else x
        dim = context_dim(placement, jnp.ndim(x)) if context else None
        if dim is not None:
            x = _context_permute(x, dim, mesh, balanced, name)
        arg_specs.append(_placement_spec(placement, jnp.ndim(x), row_axes, context))
        laid_out.append(x)

    is_placement = lambda a: isinstance(a, Placement)
    for placement in jax.tree.leaves(layout.output, is_leaf=is_placement):
        if placement.split == "sequence" and first is not None:  # its sequence is the input's
            _check_sequence(first, mesh, name, dim=placement.ndim - 2)
    out_specs = jax.tree.map(lambda a: _placement_spec(a, a.ndim, row_axes, context), layout.output, is_leaf=is_placement)
    result = run_in_region(
        module, fn, *laid_out,
        mesh=mesh, arg_specs=arg_specs, out_specs=out_specs, row_axes=token_axes(mesh, row_axes),
    )

    def trim(placement, y):
        y = y[..., : placement.logical] if placement.split == "last" else y
        dim = context_dim(placement, placement.ndim) if context else None
        return y if dim is None else _context_unpermute(y, dim, mesh, balanced)

    return jax.tree.map(trim, layout.output, result, is_leaf=is_placement)


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


# --- a model's region: the public entry -------------------------------------------


def model_axes(mesh: Mesh) -> frozenset[str]:
    """The axes manual in a model's region: "tensor" and every axis of size > 1
    (axes of size 1 are left out, so no trivial collectives over them appear)."""
    return frozenset({TENSOR, *(axis for axis in AXES if mesh.shape[axis] > 1)})


def model_row_axes(mesh: Mesh) -> tuple[str, ...]:
    """The batch axes a model's region splits the rows over: those of size > 1."""
    return tuple(axis for axis in BATCH_AXES if mesh.shape[axis] > 1)


def _region_row_axes() -> tuple[str, ...]:
    """The axes that split a region's tokens: the batch axes and "context" that are manual."""
    manual = jax.sharding.get_abstract_mesh().manual_axes
    if TENSOR not in manual:
        raise NameError("batch_sum / batch_mean run inside a region (a method decorated with @region).")
    return tuple(axis for axis in (*BATCH_AXES, CONTEXT) if axis in manual)


def batch_sum(x: jax.Array) -> jax.Array:
    """Inside a model's region: the sum of ``x`` over this rank's rows and every
    other data-parallel rank's (``sum_over`` the batch axes: one all-reduce)."""
    axes, total = _region_row_axes(), jnp.sum(x)
    return sum_over(total, axes) if axes else total


def batch_mean(x: jax.Array) -> jax.Array:
    """Inside a model's region: the mean of ``x`` over the whole batch (all ranks' rows)."""
    axes = _region_row_axes()
    ranks = math.prod(jax.lax.axis_size(axis) for axis in axes)
    return batch_sum(x) / (x.size * ranks)


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array) or (hasattr(x, "__array__") and hasattr(x, "shape"))


def _output_spec(placement: Placement, rows: tuple[str, ...], context: bool = False) -> P:
    if placement.split == "replicated" and placement.ndim == 0:  # a prefix: rows on dim 0, or a statistic
        return P(rows or None) if placement.rows else P()
    return _placement_spec(placement, placement.ndim, rows, context)


def enter_region(module: nnx.Module, fn: Callable[..., Any], *args: Any, output: Any = STATISTIC) -> Any:
    """``fn(module, *args)`` as one region of ``module.mesh`` (what ``@region`` runs).

    Every array in ``args`` (pytrees too) holds rows on dim 0, split over the
    batch axes of size > 1; anything else (ints, strings, None) is passed as is.
    ``output``: a pytree of ``Placement``s, a prefix of the result's:
    ``STATISTIC`` (the same on every rank: a loss, metrics), ``ROWS`` (rows
    split like the inputs, replicated over "tensor"), or ``features(n).of(ndim)``
    (the last dim split over "tensor", trimmed to ``n``). Parameters enter as
    their shards; those replicated over the batch axes get their gradients
    summed over them once (``run_in_region``).
    """
    mesh = getattr(module, "mesh", None)
    if not isinstance(mesh, Mesh):
        raise BadInput(f"{type(module).__name__} has no mesh: a model entering a region keeps its mesh as self.mesh.")
    rows = model_row_axes(mesh)
    ranks = math.prod(mesh.shape[axis] for axis in rows)
    context, balanced = mesh.shape[CONTEXT] > 1, getattr(module, "context_balance", True)
    leaves, structure = jax.tree.flatten(args)
    arrays = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
    for i in arrays:
        if jnp.ndim(leaves[i]) and leaves[i].shape[0] % ranks:
            raise BadInput(
                f"{type(module).__name__}: batch size {leaves[i].shape[0]} must be divisible by the "
                f"batch axes' ranks ({' x '.join(f'{a} {mesh.shape[a]}' for a in rows)} = {ranks})."
            )
    # on a context mesh, dim 1 of every argument of rank >= 2 is a sequence, split over "context"
    sequences = [i for i in arrays if context and jnp.ndim(leaves[i]) >= 2]
    values = [
        _context_permute(leaves[i], 1, mesh, balanced, type(module).__name__) if i in sequences else leaves[i]
        for i in arrays
    ]

    def body(module, *values):
        full = list(leaves)
        for i, value in zip(arrays, values):
            full[i] = value
        return fn(module, *jax.tree.unflatten(structure, full))

    is_placement = lambda a: isinstance(a, Placement)
    result = run_in_region(
        module, body, *values, mesh=mesh,
        arg_specs=[P(rows or None, CONTEXT) if i in sequences else P(rows) if jnp.ndim(leaves[i]) else P() for i in arrays],
        out_specs=jax.tree.map(lambda a: _output_spec(a, rows, context), output, is_leaf=is_placement),
        row_axes=token_axes(mesh, rows), axes=model_axes(mesh),
    )

    def trim(placement, y):
        y = y[..., : placement.logical] if placement.split == "last" else y
        dim = context_dim(placement, placement.ndim) if context else None
        return y if dim is None else _context_unpermute(y, dim, mesh, balanced)

    return jax.tree.map(trim, output, result, is_leaf=is_placement)


ROWS = REPLICATED
"""A region's result with rows on dim 0 (split like the batch), replicated over "tensor"."""


def region(output: Any = STATISTIC) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Marks a method of a model (an ``nnx.Module`` with a ``mesh``) as its region.

    Called from ordinary jit code, the method runs once inside one shard_map of
    the model's mesh (``enter_region``): every layer in it runs its local math
    with the collectives it spells out, and no layer enters a region of its
    own. Called inside a region it is the plain method. ``output``: how the
    result lies (``STATISTIC``, ``ROWS``, ``features(n).of(ndim)``; a pytree
    prefix of the result)::

        class Classifier(nnx.Module):
            @tp.region()
            def loss(self, images, labels):          # this rank's rows
                logits = self.head(self.blocks(self.embed(images)))
                return tp.batch_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), {}
    """

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def entered(self, *args):
            if in_region():
                return method(self, *args)
            return enter_region(self, method, *args, output=output)

        return entered

    return decorate
