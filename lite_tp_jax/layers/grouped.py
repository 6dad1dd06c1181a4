"""Grouped expert dispatch: rows sorted by expert, exchanged over "expert" as
variable-sized groups, run as grouped matmuls, and brought back in place.

One rank's view (``ep`` = size of "expert", ``E_l = E / ep`` experts per rank,
``n`` = this rank's (token, choice) rows, those to drop sorted last)::

    rows [n, H] sorted by expert; counts [E] kept rows per expert
      -> all-to-all over "expert" of counts [ep, E_l]          (ep * E_l ints)
      -> exchange over "expert": the rows for rank j go to rank j
         ragged (GPU, TPU): jax.lax.ragged_all_to_all, only the rows sent
         padded (CPU):      jax.lax.all_to_all of [ep, n, H], chunk j holding the
                            rows for rank j, zero-padded (XLA:CPU has no
                            ragged-all-to-all)
         received [ep * n, H]: rank j's rows at [j * n, j * n + sent_j)
      -> local sort by local expert; experts(grouped, group sizes [E_l])   (ragged_dot)
      -> local unsort; the reverse exchange (ragged or padded)  -> [n, H'] in the sorted order

Both exchanges give the same received buffer and the same result, so the code
after them is shared; ``jax.lax.platform_dependent`` picks the padded one when
lowering for CPU and the ragged one elsewhere (``exchange="auto"``). Autodiff
transposes each exchange into the reverse one. The expert computation sees
``ep * n`` rows, of which only the received ones are in a group: ``ragged_dot``
does work for the ``sum(group sizes)`` rows on GPU and TPU (on XLA:CPU, JAX
lowers it to a dense masked dot over all groups).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lite_tp_jax.core.axes import EXPERT

EXCHANGES = ("auto", "ragged", "padded")


def exclusive_cumsum(x: jax.Array) -> jax.Array:
    return jnp.cumsum(x) - x


def inverse_permutation(permutation: jax.Array) -> jax.Array:
    """The inverse of a permutation of ``arange(n)``."""
    n = permutation.shape[0]
    return jnp.zeros_like(permutation).at[permutation].set(jnp.arange(n, dtype=permutation.dtype))


def sort_by_expert(keys: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """``(order, counts)`` for expert ids ``keys [n]`` (``num_experts`` marks a
    row to drop): ``keys[order]`` is sorted (stable, dropped rows last) and
    ``counts [E]`` is the number of kept rows per expert."""
    order = jnp.argsort(keys, stable=True)
    counts = jnp.zeros((num_experts + 1,), jnp.int32).at[keys].add(1)[:num_experts]
    return order, counts


def _zeros_like_type(like: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Zeros of ``shape`` varying over the same manual axes as ``like``."""
    zeros = jnp.zeros(shape, like.dtype)
    varying = tuple(sorted(jax.typeof(like).mat.varying))
    return jax.lax.pcast(zeros, varying, to="varying") if varying else zeros


def _bucket(ends: jax.Array, position: jax.Array) -> jax.Array:
    """The group of each ``position`` given the groups' cumulative ``ends`` (last
    axis): how many groups end at or before it."""
    return jnp.sum(ends <= position[..., None], axis=-1, dtype=jnp.int32)


def _positions(n: int) -> jax.Array:
    return jnp.arange(n, dtype=jnp.int32)


def _send_padded(rows, input_offsets, send_sizes, recv_sizes):
    del recv_sizes
    ep, n = send_sizes.shape[0], rows.shape[0]
    position = _positions(n)
    index = jnp.minimum(input_offsets[:, None] + position[None], n - 1)  # [ep, n]
    valid = (position[None] < send_sizes[:, None])[..., None]
    chunks = jnp.where(valid, rows[index], jnp.zeros((), rows.dtype))  # [ep, n, H]: chunk j for rank j
    received = jax.lax.all_to_all(chunks, EXPERT, 0, 0, tiled=True)  # chunk j from rank j
    return received.reshape(ep * n, *rows.shape[1:])


def _send_ragged(rows, input_offsets, send_sizes, recv_sizes):
    ep, n = send_sizes.shape[0], rows.shape[0]
    output = _zeros_like_type(rows, (ep * n, *rows.shape[1:]))
    output_offsets = jnp.full((ep,), n, jnp.int32) * jax.lax.axis_index(EXPERT)  # rank r's rows land at r * n
    return jax.lax.ragged_all_to_all(
        rows, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=EXPERT
    )


def _return_padded(out, input_offsets, send_sizes, recv_sizes):
    del recv_sizes
    ep = send_sizes.shape[0]
    n = out.shape[0] // ep
    back = jax.lax.all_to_all(out.reshape(ep, n, *out.shape[1:]), EXPERT, 0, 0, tiled=True)  # chunk j: from rank j
    position = _positions(n)
    rank = _bucket(jnp.cumsum(send_sizes)[None, :], position)  # ep for rows not sent (dropped)
    kept = rank < ep
    rank = jnp.minimum(rank, ep - 1)
    index = jnp.clip(position - input_offsets[rank], 0, n - 1)
    rows = back[rank, index]
    return jnp.where(kept.reshape(-1, *[1] * (out.ndim - 1)), rows, jnp.zeros((), out.dtype))


def _return_ragged(out, input_offsets, send_sizes, recv_sizes):
    ep = send_sizes.shape[0]
    n = out.shape[0] // ep
    output = _zeros_like_type(out, (n, *out.shape[1:]))
    # Rank j's rows sit at j * n here; they go back to where rank j took them from.
    where_taken = jax.lax.all_to_all(input_offsets, EXPERT, 0, 0, tiled=True)
    return jax.lax.ragged_all_to_all(
        out, output, _positions(ep) * n, recv_sizes, where_taken, send_sizes, axis_name=EXPERT
    )


def _by_platform(exchange: str, padded: Callable, ragged: Callable, *args):
    if exchange == "padded":
        return padded(*args)
    if exchange == "ragged":
        return ragged(*args)
    return jax.lax.platform_dependent(*args, cpu=padded, default=ragged)


def grouped_experts(
    rows: jax.Array,
    counts: jax.Array,
    experts: Callable[[jax.Array, jax.Array], jax.Array],
    exchange: str = "auto",
) -> jax.Array:
    """``experts`` applied to ``rows [n, H]`` sorted by expert (``counts [E]``
    kept rows per expert, the rest last), each row by its expert wherever that
    lives; returns ``[n, H']`` in the same order, zero for the rows not kept.
    ``experts(grouped [m, H], group_sizes [E_l])`` runs this rank's experts on
    rows grouped by local expert (rows past ``sum(group_sizes)`` in no group)."""
    if EXPERT not in jax.sharding.get_abstract_mesh().manual_axes:
        return experts(rows, counts)
    ep, n = jax.lax.axis_size(EXPERT), rows.shape[0]
    per_rank = counts.reshape(ep, -1)  # [ep, E_l]: rows for rank j's experts
    local_experts = per_rank.shape[1]
    send_sizes = jnp.sum(per_rank, axis=1)
    input_offsets = exclusive_cumsum(send_sizes)
    received_counts = jax.lax.all_to_all(per_rank, EXPERT, 0, 0, tiled=True)  # row j: from rank j
    recv_sizes = jnp.sum(received_counts, axis=1)
    sizes = (input_offsets, send_sizes, recv_sizes)

    received = _by_platform(exchange, _send_padded, _send_ragged, rows, *sizes)
    received = checkpoint_name(received, "moe_dispatched")  # [ep * n, H]

    # Group the received rows by local expert (rank j's chunk is sorted by expert already).
    position = _positions(n)
    local = _bucket(jnp.cumsum(received_counts, axis=1)[:, None, :], position[None, :])  # [ep, n]
    local = jnp.where(position[None] < recv_sizes[:, None], local, local_experts).reshape(-1)  # [ep * n]
    order = jnp.argsort(local, stable=True)
    out = experts(received[order], jnp.sum(received_counts, axis=0))
    out = out[inverse_permutation(order)]
    out = jnp.where((local < local_experts)[:, None], out, jnp.zeros((), out.dtype))

    back = _by_platform(exchange, _return_padded, _return_ragged, out, *sizes)
    return checkpoint_name(back, "moe_combined")
