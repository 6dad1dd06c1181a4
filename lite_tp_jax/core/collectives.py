"""Collectives over named mesh axes, and the Megatron conjugate pairs.

Everything here runs inside ``jax.shard_map`` with the axes manual. The three
primitives are thin, named wrappers. The conjugate pairs each state their
forward collective and, next to it, the backward collective that autodiff must
run, so gradients are right by construction. Over any axes they have neutral
names; within a tensor-parallel group, Megatron-LM's
(``megatron/core/tensor_parallel/mappings.py``):

    generic (any axes)        Megatron ("tensor")                 forward          backward
    broadcast_over            copy_to_tensor_region               identity         all-reduce
    sum_over                  reduce_from_tensor_region           all-reduce       identity
    scatter_over              scatter_to_tensor_region            split (local)    all-gather
    gather_replicated_over    gather_from_tensor_region           all-gather       split (local)
    gather_over               gather_from_sequence_region         all-gather       reduce-scatter
    reduce_scatter_over       reduce_scatter_to_sequence_region   reduce-scatter   all-gather

Deterministic mode (``with deterministic_collectives():``, or
``train.deterministic: true``) swaps the two reducing primitives for a
fixed-order version: an all-to-all of chunks, a local sum in rank order, and
(for ``all_reduce``) an all-gather. The bits then do not depend on how devices
are spread over processes or on XLA's choice of reduction tree; the bytes per
device are those of a ring all-reduce, 2(n-1)/n of the array.

A tensor-parallel block (MLP, attention, MoE, the tied head) enters and leaves
the region once, through the pair ``enter_tensor_parallel`` /
``exit_tensor_parallel``: with sequence parallelism an all-gather on entry and
a reduce-scatter on exit, otherwise an identity and an all-reduce.

Values follow JAX's varying/invariant typing (``check_vma``): a value that is
identical on every rank of the axis is *invariant*, a per-rank value is
*varying*. The functions take and return the types in the table's sense.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
from jax._src import config as _jax_config
from jax.ad_checkpoint import checkpoint_name

from lite_tp_jax.core.axes import TENSOR

Axis = str | tuple[str, ...]
"""One mesh axis, or several acting as one (rank = row-major index over them)."""


# --- primitives ---------------------------------------------------------------


def check_axis(axis: Axis) -> Axis:
    """``axis``, after checking that it names manual axes of the enclosing shard_map."""
    manual = jax.sharding.get_abstract_mesh().manual_axes
    for name in (axis,) if isinstance(axis, str) else axis:
        if name not in manual:
            raise NameError(
                f"Collective over mesh axis {name!r}, which is not a manual axis here; "
                f"call it inside jax.shard_map over one of {tuple(manual) or 'the mesh axes'}."
            )
    return axis


def _not_yet_varying(x: jax.Array, axis: Axis) -> tuple[str, ...]:
    varying = jax.typeof(x).mat.varying
    return tuple(name for name in ((axis,) if isinstance(axis, str) else axis) if name not in varying)


_DETERMINISTIC = _jax_config.bool_state(
    "lite_tp_deterministic_collectives",
    False,
    help="lite_tp_jax: reduce in fixed rank order (all-to-all, local sum, all-gather).",
    include_in_jit_key=True,
    include_in_trace_context=True,
)
# A jax config state (not a module global) so that jit caches are keyed by it:
# a function traced in one mode is never reused in the other.


@contextlib.contextmanager
def deterministic_collectives(enabled: bool = True) -> Iterator[None]:
    """Within this block, functions traced reduce in fixed rank order (the
    switch is read at trace time; already-compiled functions keep their mode)."""
    with _DETERMINISTIC(enabled):
        yield


def deterministic() -> bool:
    """Whether reductions traced now use the fixed-order implementation."""
    return bool(_DETERMINISTIC.value)


def all_reduce(x: jax.Array, axis: Axis = TENSOR) -> jax.Array:
    """Sum of ``x`` over the ranks of ``axis``; every rank gets the total."""
    axis = check_axis(axis)
    if not deterministic():
        return jax.lax.psum(x, axis)
    return _ordered_all_reduce(to_varying(x, axis), axis)


def all_gather(x: jax.Array, axis: Axis = TENSOR, *, dim: int = -1) -> jax.Array:
    """Concatenation of every rank's ``x`` along ``dim``, in rank order."""
    return jax.lax.all_gather(x, check_axis(axis), axis=dim % x.ndim, tiled=True)


def reduce_scatter(x: jax.Array, axis: Axis = TENSOR, *, dim: int = -1) -> jax.Array:
    """Sum over ranks, then rank i keeps the i-th of ``axis_size`` slices of ``dim``."""
    axis = check_axis(axis)
    if not deterministic():
        return jax.lax.psum_scatter(x, axis, scatter_dimension=dim % x.ndim, tiled=True)
    return _ordered_reduce_scatter(to_varying(x, axis), axis, dim % x.ndim)


def all_to_all(x: jax.Array, axis: Axis, *, split_dim: int, concat_dim: int) -> jax.Array:
    """Rank i sends the j-th of ``axis_size`` slices of ``split_dim`` to rank j,
    which concatenates what it receives along ``concat_dim``, in rank order.
    Its transpose (autodiff's backward) is the reverse exchange."""
    return jax.lax.all_to_all(x, check_axis(axis), split_dim % x.ndim, concat_dim % x.ndim, tiled=True)


# --- the fixed-order (deterministic) reductions ---------------------------------


def _sum_in_rank_order(chunks: jax.Array) -> jax.Array:
    """``((c[0] + c[1]) + c[2]) + ...``: one add per rank, always in this order."""
    return functools.reduce(operator.add, [chunks[r] for r in range(chunks.shape[0])])


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ordered_all_reduce(x: jax.Array, axis: Axis) -> jax.Array:
    """Rank i receives chunk i of every rank (all-to-all), sums them in rank
    order, and the summed chunks are all-gathered: (n-1)/n of x sent each way."""
    n = jax.lax.axis_size(axis)
    flat = x.reshape(-1)
    flat = jnp.pad(flat, (0, -flat.size % n))
    mine = jax.lax.all_to_all(flat.reshape(n, -1), axis, 0, 0, tiled=True)  # row r: rank r's chunk
    total = jax.lax.all_gather(_sum_in_rank_order(mine), axis, axis=0, tiled=True, to="invarying")
    return total[: x.size].reshape(x.shape)


def _ordered_all_reduce_fwd(x, axis):
    return _ordered_all_reduce(x, axis), None


def _ordered_all_reduce_bwd(axis, _, g):  # as psum's: the cotangent, now per rank
    return (to_varying(g, axis),)


_ordered_all_reduce.defvjp(_ordered_all_reduce_fwd, _ordered_all_reduce_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _ordered_reduce_scatter(x: jax.Array, axis: Axis, dim: int) -> jax.Array:
    """Rank i receives slice i of ``dim`` from every rank (all-to-all) and sums
    them in rank order: (n-1)/n of x sent, as a ring reduce-scatter."""
    n = jax.lax.axis_size(axis)
    if x.shape[dim] % n:
        raise ValueError(
            f"reduce_scatter over {axis!r} splits dim {dim} of shape {x.shape} into {n} "
            f"equal slices; its size must be divisible by {n}."
        )
    slices = jnp.moveaxis(x, dim, 0).reshape(n, x.shape[dim] // n, *x.shape[:dim], *x.shape[dim + 1:])
    mine = jax.lax.all_to_all(slices, axis, 0, 0, tiled=True)  # row r: rank r's slice for me
    return jnp.moveaxis(_sum_in_rank_order(mine), 0, dim)


def _ordered_reduce_scatter_fwd(x, axis, dim):
    return _ordered_reduce_scatter(x, axis, dim), None


def _ordered_reduce_scatter_bwd(axis, dim, _, g):  # as psum_scatter's: all-gather
    return (jax.lax.all_gather(g, axis, axis=dim, tiled=True),)


_ordered_reduce_scatter.defvjp(_ordered_reduce_scatter_fwd, _ordered_reduce_scatter_bwd)


def split(x: jax.Array, axis: Axis = TENSOR, *, dim: int = -1) -> jax.Array:
    """Rank i's slice of ``dim`` (no communication)."""
    check_axis(axis)
    dim = dim % x.ndim
    size = x.shape[dim] // jax.lax.axis_size(axis)
    start = jax.lax.axis_index(axis) * size
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=dim)


def to_varying(x: jax.Array, axis: Axis = TENSOR) -> jax.Array:
    """Marks an invariant value as per-rank (no communication)."""
    missing = _not_yet_varying(x, check_axis(axis))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def cast_for(w: jax.Array, x: jax.Array, dtype=None) -> jax.Array:
    """Parameter ``w`` cast to ``dtype`` (default: activation ``x``'s) for use
    with ``x`` (mixed precision: float32 master weights, bfloat16 compute). ``w``
    is first made per-rank over the axes ``x`` varies along (what using it with
    ``x`` would do implicitly), so the backward's gradient sum over those ranks
    runs in ``w``'s float32."""
    dtype = x.dtype if dtype is None else dtype
    if w.dtype == dtype:
        return w
    varying = jax.typeof(w).mat.varying
    missing = tuple(sorted(axis for axis in jax.typeof(x).mat.varying if axis not in varying))
    return (jax.lax.pcast(w, missing, to="varying") if missing else w).astype(dtype)


# --- conjugate pairs: a forward collective and, next to it, its backward -------
#
# The generic pairs, over any axes (a pipeline's stages, the batch axes, "data"):


def broadcast_over(x: jax.Array, axis: Axis) -> jax.Array:
    """Forward: identity (``x`` the same on every rank of ``axis``). Backward:
    all-reduce: a value used on every rank gets the sum of their gradients.

    A value that is already per-rank passes through unchanged both ways: it
    was broadcast earlier, and its one backward all-reduce happens there.
    """
    missing = _not_yet_varying(x, check_axis(axis))
    return _broadcast_over(x, missing) if missing else x


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_over(x, axis):
    return jax.lax.pcast(x, axis, to="varying")


def _broadcast_fwd(x, axis):
    return jax.lax.pcast(x, axis, to="varying"), None


def _broadcast_bwd(axis, _, g):
    return (all_reduce(g, axis),)


_broadcast_over.defvjp(_broadcast_fwd, _broadcast_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def sum_over(x: jax.Array, axis: Axis) -> jax.Array:
    """Forward: all-reduce of per-rank partial sums. Backward: identity."""
    return all_reduce(x, axis)


def _sum_fwd(x, axis):
    return all_reduce(x, axis), None


def _sum_bwd(axis, _, g):
    return (to_varying(g, axis),)


sum_over.defvjp(_sum_fwd, _sum_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def gather_over(x: jax.Array, axis: Axis, dim: int) -> jax.Array:
    """Forward: all-gather of per-rank shards along ``dim``, used per rank.
    Backward: reduce-scatter (each rank's gradient summed, its shard kept)."""
    return all_gather(x, axis, dim=dim)


def _gather_fwd(x, axis, dim):
    return all_gather(x, axis, dim=dim), None


def _gather_bwd(axis, dim, _, g):
    return (reduce_scatter(g, axis, dim=dim),)


gather_over.defvjp(_gather_fwd, _gather_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def gather_replicated_over(x: jax.Array, axis: Axis, dim: int) -> jax.Array:
    """Forward: all-gather along ``dim``, the result the same on every rank.
    Backward: each rank keeps its slice of the (equal) gradient (split, local)."""
    return jax.lax.all_gather(x, axis, axis=dim % x.ndim, tiled=True, to="invarying")


def _gather_replicated_fwd(x, axis, dim):
    return gather_replicated_over(x, axis, dim), None


def _gather_replicated_bwd(axis, dim, _, g):
    return (split(to_varying(g, axis), axis, dim=dim),)


gather_replicated_over.defvjp(_gather_replicated_fwd, _gather_replicated_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def reduce_scatter_over(x: jax.Array, axis: Axis, dim: int) -> jax.Array:
    """Forward: reduce-scatter of partial sums along ``dim``. Backward: all-gather."""
    return reduce_scatter(x, axis, dim=dim)


def _reduce_scatter_fwd(x, axis, dim):
    return reduce_scatter(x, axis, dim=dim), None


def _reduce_scatter_bwd(axis, dim, _, g):
    return (all_gather(g, axis, dim=dim),)


reduce_scatter_over.defvjp(_reduce_scatter_fwd, _reduce_scatter_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def scatter_over(x: jax.Array, axis: Axis, dim: int) -> jax.Array:
    """Forward: keep this rank's slice of ``dim`` (local). Backward: all-gather."""
    return split(x, axis, dim=dim)


def _scatter_fwd(x, axis, dim):
    return split(x, axis, dim=dim), None


def _scatter_bwd(axis, dim, _, g):
    return (jax.lax.all_gather(g, axis, axis=dim % g.ndim, tiled=True, to="invarying"),)


scatter_over.defvjp(_scatter_fwd, _scatter_bwd)


# Megatron-LM's names for the same pairs within a tensor-parallel group (its
# ``mappings.py``); ``axis`` is "tensor", or the vocabulary's axes.


def copy_to_tensor_region(x: jax.Array, axis: Axis = TENSOR) -> jax.Array:
    """Forward: identity (input replicated on every rank). Backward: all-reduce (``broadcast_over``)."""
    return broadcast_over(x, axis)


def reduce_from_tensor_region(x: jax.Array, axis: Axis = TENSOR) -> jax.Array:
    """Forward: all-reduce of partial sums. Backward: identity (``sum_over``)."""
    return sum_over(x, axis)


def scatter_to_tensor_region(x: jax.Array, axis: Axis = TENSOR, dim: int = -1) -> jax.Array:
    """Forward: keep this rank's slice of ``dim``. Backward: all-gather (``scatter_over``)."""
    return scatter_over(x, axis, dim)


def gather_from_tensor_region(x: jax.Array, axis: Axis = TENSOR, dim: int = -1) -> jax.Array:
    """Forward: all-gather along ``dim`` (result replicated). Backward: split (``gather_replicated_over``)."""
    return gather_replicated_over(x, axis, dim)


def gather_from_sequence_region(x: jax.Array, axis: Axis = TENSOR, dim: int = 1) -> jax.Array:
    """Forward: all-gather the sequence shards. Backward: reduce-scatter (``gather_over``)."""
    return gather_over(x, axis, dim)


def reduce_scatter_to_sequence_region(x: jax.Array, axis: Axis = TENSOR, dim: int = 1) -> jax.Array:
    """Forward: reduce-scatter partial sums into sequence shards. Backward: all-gather (``reduce_scatter_over``)."""
    return reduce_scatter_over(x, axis, dim)


# --- a block's entry and exit -------------------------------------------------


def enter_tensor_parallel(x: jax.Array, sequence_parallel: bool, axis: Axis = TENSOR) -> jax.Array:
    """Entry of a block: ``x`` full on every rank (``copy_to_tensor_region``), or,
    with sequence parallelism, its sequence shards (dim -2) all-gathered
    (``gather_from_sequence_region``). Backward: all-reduce / reduce-scatter of dx."""
    if sequence_parallel:
        return gather_from_sequence_region(x, axis, -2)
    return copy_to_tensor_region(x, axis)


def exit_tensor_parallel(partial_sums: jax.Array, sequence_parallel: bool, axis: Axis = TENSOR) -> jax.Array:
    """Exit of a block: partial sums all-reduced (``reduce_from_tensor_region``), or,
    with sequence parallelism, reduce-scattered into sequence shards (dim -2)
    (``reduce_scatter_to_sequence_region``). Backward: identity / all-gather.
    The result is named ``tensor_exit``: a remat policy that keeps it never reruns the reduction."""
    if sequence_parallel:
        return checkpoint_name(reduce_scatter_to_sequence_region(partial_sums, axis, -2), "tensor_exit")
    return checkpoint_name(reduce_from_tensor_region(partial_sums, axis), "tensor_exit")
