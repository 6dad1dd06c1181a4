"""Where the sequence lies over the "context" axis (context parallelism).

With ``mesh.context: n`` the sequence of every activation, token, target and
position is split over "context" for the whole model. The split is of the
*permuted* sequence: its slots hold global positions ``sequence_order(S, n)``,
and context rank ``r`` holds the contiguous slots ``r*S/n .. (r+1)*S/n - 1``.

    balanced (default, "zigzag"): the sequence cut into 2n chunks; rank r holds
                 chunks r and 2n-1-r, so under a causal mask every rank has the
                 same number of (query, key) pairs to compute.
                     n = 2, S = 8:  order 0 1 6 7 | 2 3 4 5
    unbalanced:  rank r holds chunk r of n (order = 0..S-1).

The tokens are permuted once, where they enter the model's region (``local``:
each rank takes its slots of the whole rows, no communication); positions
(RoPE, learned) are the global ones the slots hold, so the math is the
one-device math, and the targets are taken alike. A loss is a sum over tokens,
so it does not change. Token-local layers (embedding, norms, MLP, MoE, the
loss) only see fewer tokens; attention is the one layer that meets the other
ranks' tokens (``layers/attention.py``: all-gather, ring or all-to-all of its
K/V or heads over "context").

With sequence parallelism the sequence between blocks is split over
("context", "tensor"): each context rank's slots split again over "tensor".

The functions below run inside a region; outside one (or where "context" is
not manual) the context size is 1 and they are identities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lite_tp_jax.core.axes import CONTEXT
from lite_tp_jax.core.errors import FitError


def sequence_order(seq_len: int, ranks: int, balanced: bool = True) -> np.ndarray:
    """``int32 [seq_len]``: the global position held by each slot of the sequence
    as it lies over ``ranks`` context ranks (rank r: slots ``r*S/n ..``)."""
    if ranks == 1 or not balanced:
        return np.arange(seq_len, dtype=np.int32)
    chunks = np.arange(seq_len, dtype=np.int32).reshape(2 * ranks, -1)
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * ranks - 1 - r]]) for r in range(ranks)])


def check_context_split(seq_len: int, context: int, balanced: bool, owner: str = "") -> None:
    """The sequence splits evenly over "context": into ``context`` blocks, or
    ``2 x context`` chunks with the load balance (a ``FitError``)."""
    parts = 2 * context if balanced and context > 1 else context
    if seq_len % parts:
        what = (f"2 x {{context}} = {parts} chunks (the load balance; or set {{context_load_balance.name}} false)"
                if parts != context else "{context}")
        raise FitError(
            f"{owner}{{seq_len}} must be divisible by {what}: context parallelism splits the sequence evenly",
            seq_len=seq_len, context=context, context_load_balance=balanced,
        )


def context_size() -> int:
    """The number of context ranks here (1 outside a region where "context" is manual)."""
    return jax.lax.axis_size(CONTEXT) if CONTEXT in jax.sharding.get_abstract_mesh().manual_axes else 1


def local_positions(local_len: int, balanced: bool) -> jax.Array:
    """``int32 [local_len]``: the global positions of this context rank's slots."""
    ranks = context_size()
    if ranks == 1:
        return jnp.arange(local_len, dtype=jnp.int32)
    order = jnp.asarray(sequence_order(local_len * ranks, ranks, balanced))
    return jax.lax.dynamic_slice_in_dim(order, jax.lax.axis_index(CONTEXT) * local_len, local_len)


def all_positions(local_len: int, balanced: bool) -> jax.Array:
    """``int32 [local_len x n]``: the global positions of every slot, in rank order
    (what an all-gather over "context" of per-rank values holds)."""
    ranks = context_size()
    return jnp.asarray(sequence_order(local_len * ranks, ranks, balanced))


def take_local(x: jax.Array, balanced: bool, dim: int = 1) -> jax.Array:
    """This context rank's tokens of ``x``, whose ``dim`` is the whole sequence in
    its natural order (the permutation at the model's input; no communication)."""
    ranks = context_size()
    if ranks == 1:
        return x
    return jnp.take(x, local_positions(x.shape[dim] // ranks, balanced), axis=dim)


def natural_order(x: jax.Array, balanced: bool, dim: int = 1) -> jax.Array:
    """``x`` whose ``dim`` holds every slot in rank order (gathered over
    "context"), put back in the sequence's natural order (local, no communication)."""
    ranks = context_size()
    if ranks == 1 or not balanced:
        return x
    return jnp.take(x, jnp.asarray(np.argsort(sequence_order(x.shape[dim], ranks, balanced))), axis=dim)
