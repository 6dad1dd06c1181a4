"""Ring attention: context parallelism's attention core, K/V passed round the ring of ``axis_name``.

Each of the n ranks of ``axis_name`` ("context") holds one block of the
sequence: its queries ``q [B, Sq, N, D]``, its keys and values
``k, v [B, Sk, K, D]`` and those tokens' *global* positions (any order: with
the zigzag load balance rank r holds chunks r and 2n-1-r, so the mask always
comes from positions, ``masks.attention_mask``, never from an iota). Rank r,
step t = 0 .. n-1, holds the K/V block of rank r - t::

    o, lse <- merge(o, lse, softmax(mask(q K_t^T / sqrt(D))) V_t)     local, float32 (online softmax)
    K, V, k positions, k segments -> rank r + 1                       collective-permute, t < n - 1

The merge is the online softmax (running max, sum and weighted values in
float32); a row with no visible key yet contributes nothing and never a NaN.
Each held block is cut in sub-blocks (the query and key sides each in 2, 4,
... equal parts of at most ``block_size`` positions), visited in one loop in a
fixed order; a sub-block with no visible (query, key) pair is skipped
(``lax.cond``). Under a causal mask the contiguous layout skips the future
blocks whole and the diagonal block's sub-blocks above its diagonal, and the
zigzag layout, in which
every off-diagonal block is exactly half visible, skips that empty half: every
rank then does the same work. The float32 scores live one sub-block at a time
(``B * block_size^2 * N``), so memory grows linearly with the sequence.

Backward (``jax.custom_vjp``; residuals q, k, v, out, lse and the positions,
nothing per block): a second ring recomputes each block's probabilities from
lse, ``dS = P * (dP - rowsum(dO * O))``. dQ accumulates locally. Rank r keeps
its own block's dK, dV aside (step 0); from step 1 a float32 dK/dV
accumulator travels with each K/V block, collecting the contribution of every
other rank in ring order, and one last permute brings it home to the block's
owner, which adds its own. A fixed order throughout: the bits do not vary run
to run.

Communication per call, per device (``E = B * Sk * K * D`` elements of k):

    forward:   n - 1 collective-permutes each of K and V (E elements, k's dtype),
               and of k positions and segments (Sk or B * Sk int32)
    backward:  n - 1 each of K and V (E, k's dtype), n - 1 each of dK and dV
               (E, float32), and of the positions and segments again

(Seen in XLA:CPU's compiled HLO: bfloat16 permutes are widened to float32; at
n = 2 a value-and-gradient program reuses the forward's one permute of K and
of V in the backward instead of repeating it.)

n = 1 is plain attention: no permutes. The caller splits heads over "tensor"
as it likes: kv heads split with their query groups, or replicated when
fewer than the tensor ranks (then their gradient is summed over "tensor" by
the varying/invariant typing, ``check_vma``, on the way out).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lite_tp_jax.layers.masks import attention_mask

BLOCK_SIZE = 512
"""Default longest side of a sub-block: the float32 scores of one sub-block are
``B * block_size^2 * N`` elements, whatever the sequence length."""


class _Ring(NamedTuple):
    """The static part of a call: the ring's axis and the mask's shape."""

    axis_name: str
    causal: bool
    window: int | None
    block_size: int


class _Where(NamedTuple):
    """Global positions and segment ids (or None) of the local queries and of the held keys."""

    q_positions: jax.Array
    k_positions: jax.Array
    q_segments: jax.Array | None
    k_segments: jax.Array | None


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis_name: str,
    q_positions: jax.Array,
    k_positions: jax.Array,
    causal: bool = True,
    window: int | None = None,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    block_size: int = BLOCK_SIZE,
) -> jax.Array:
    """``softmax(mask(q k^T / sqrt(D))) v`` of the local queries over the whole
    sequence's keys, ``[B, Sq, N, D]`` in ``v``'s dtype. Call inside a
    ``shard_map`` body in which ``axis_name`` is manual.

    ``q``: ``[B, Sq, N, D]`` this rank's queries; ``k``, ``v``: ``[B, Sk, K, D]``
    this rank's keys and values, ``K`` dividing ``N`` (query head ``n`` attends
    with kv head ``n // (N / K)``). ``q_positions`` / ``k_positions``: ``[Sq]`` /
    ``[Sk]`` or ``[B, Sq]`` / ``[B, Sk]`` integer global positions of those
    tokens; ``q_segments`` / ``k_segments`` (both or neither) their document
    ids, same shapes. ``causal``, ``window``, segments: ``masks.attention_mask``.
    Scores, softmax and the merge run in float32, one sub-block of at most
    ``block_size`` queries by ``block_size`` keys at a time.
    """
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"ring_attention block_size must be a positive int (e.g. {BLOCK_SIZE}), got {block_size!r}.")
    if (q_segments is None) != (k_segments is None):
        raise ValueError("ring_attention needs both q_segments and k_segments, or neither.")
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[::3] != k.shape[::3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"ring_attention needs q [B, Sq, N, D] and k, v [B, Sk, K, D] with K dividing N, "
            f"got q {q.shape}, k {k.shape}, v {v.shape}."
        )
    if q_positions.shape[-1] != q.shape[1] or k_positions.shape[-1] != k.shape[1]:
        raise ValueError(
            f"ring_attention positions must be [Sq] / [Sk] (or [B, Sq] / [B, Sk]) for q {q.shape} and k {k.shape}, "
            f"got {q_positions.shape} and {k_positions.shape}."
        )
    where = _Where(q_positions, k_positions, q_segments, k_segments)
    # Every input varies over the ring's axis and over every axis any of them
    # varies along, so the loop's carries keep one type. Done here, outside the
    # custom_vjp, so autodiff sums the gradient of an input that was the same
    # on every rank (kv heads replicated over "tensor") over those ranks.
    axes = {axis_name}
    for x in (q, k, v, *jax.tree.leaves(where)):
        axes |= set(jax.typeof(x).mat.varying)
    q, k, v, where = jax.tree.map(partial(_varying, axes=axes), (q, k, v, where))
    return _ring(_Ring(axis_name, causal, window, block_size), q, k, v, where)


def _varying(x: jax.Array, axes: set[str]) -> jax.Array:
    missing = tuple(sorted(axes - set(jax.typeof(x).mat.varying)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


# --- the forward ring ---------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(ring: _Ring, q, k, v, where: _Where):
    return _forward(ring, q, k, v, where)[0]


def _forward(ring: _Ring, q, k, v, where: _Where):
    """``(out [B, Sq, N, D], lse [B, Sq, N] float32)``; lse is -inf for a row that sees no key."""
    b, sq, heads, d = q.shape
    kv_heads = k.shape[2]
    # The masks below depend on the positions alone, the same at every layer: in a
    # layer scan, JAX's partial evaluation would hoist every (step, sub-block)'s
    # mask and masked scores out of it, all of them live at once (quadratic in the
    # sequence). Tying the positions to q through a barrier keeps them in the loop.
    q, where = jax.lax.optimization_barrier((q, where))
    queries = q.reshape(b, sq, kv_heads, heads // kv_heads, d)
    stats = _zeros_like(queries, queries.shape[:-1], jnp.float32)
    state = (stats - jnp.inf, stats, _zeros_like(queries, queries.shape, jnp.float32))  # running max, sum, values

    def attend(state, held):
        k, v, k_positions, k_segments = held

        def sub_block(state, rows, cols):
            visible = _mask(ring, rows, (where.q_positions, where.q_segments), cols, (k_positions, k_segments))
            part = jax.lax.cond(
                jnp.any(visible), _online_softmax, lambda s, *_: s, rows.take(state, 1), rows.take(queries, 1),
                cols.take(k, 1), cols.take(v, 1), visible,
            )
            return rows.put(state, part, 1)

        return _sub_blocks(sub_block, state, sq, k.shape[1], ring.block_size)

    held = (k, v, where.k_positions, where.k_segments)
    n = jax.lax.axis_size(ring.axis_name)
    if n > 1:

        def step(carry, _):
            state, held = carry
            arriving = _pass_on(held, ring.axis_name, n)  # issued first, so it overlaps the block's math
            return (attend(state, held), arriving), None

        (state, held), _ = jax.lax.scan(step, (state, held), length=n - 1)
    m, total, acc = attend(state, held)
    seen = total > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, total, 1)[..., None], 0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1)), -jnp.inf)
    return out.reshape(q.shape).astype(v.dtype), lse.reshape(b, sq, heads)


def _online_softmax(state, q, k, v, visible):
    """One (query part, key part) sub-block merged into the running (max, sum, weighted values)."""
    m, total, acc = state
    scores = jnp.einsum("bqkgd,bskd->bqkgs", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(_broadcast(visible), scores / jnp.sqrt(jnp.float32(q.shape[-1])), -jnp.inf)
    m_new = jnp.maximum(m, scores.max(axis=-1))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0)  # -inf while a row has seen nothing: exp(-inf) = 0, no NaN
    p = jnp.exp(scores - shift[..., None])
    scale = jnp.exp(m - shift)
    pv = jnp.einsum("bqkgs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, total * scale + p.sum(axis=-1), acc * scale[..., None] + pv


# --- the backward ring --------------------------------------------------------


def _ring_fwd(ring: _Ring, q, k, v, where: _Where):
    out, lse = _forward(ring, q, k, v, where)
    return out, (q, k, v, out, lse, where)


def _ring_bwd(ring: _Ring, residuals, d_out):
    q, k, v, out, lse, where = residuals
    b, sq, heads, d = q.shape
    kv_heads, group = k.shape[2], heads // k.shape[2]
    grouped = (b, sq, kv_heads, group)
    queries, d_out = q.reshape(*grouped, d), d_out.reshape(*grouped, d)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.reshape(*grouped, d).astype(jnp.float32), axis=-1)
    lse = jnp.where(jnp.isfinite(lse), lse, 0).reshape(grouped)  # a row that sees nothing has p = 0 anyway

    def gradients(d_q, held, d_kv):
        """Adds the held block's contributions to dQ (local) and to its dK, dV."""
        k, v, k_positions, k_segments = held

        def sub_block(grads, rows, cols):
            d_q, d_k, d_v = grads
            visible = _mask(ring, rows, (where.q_positions, where.q_segments), cols, (k_positions, k_segments))
            part = jax.lax.cond(
                jnp.any(visible), _block_gradients, lambda s, *_: s,
                (rows.take(d_q, 1), cols.take(d_k, 1), cols.take(d_v, 1)),
                *(rows.take(x, 1) for x in (queries, d_out, lse, delta)), cols.take(k, 1), cols.take(v, 1), visible,
            )
            return rows.put(d_q, part[0], 1), cols.put(d_k, part[1], 1), cols.put(d_v, part[2], 1)

        d_q, d_k, d_v = _sub_blocks(sub_block, (d_q, *d_kv), sq, k.shape[1], ring.block_size)
        return d_q, (d_k, d_v)

    zeros_kv = _zeros_like(k, k.shape, jnp.float32)
    held = (k, v, where.k_positions, where.k_segments)
    d_q, own = gradients(_zeros_like(queries, queries.shape, jnp.float32), held, (zeros_kv, zeros_kv))  # step 0
    n = jax.lax.axis_size(ring.axis_name)
    if n > 1:
        held = _pass_on(held, ring.axis_name, n)
        travelling = (zeros_kv, zeros_kv)  # the dK, dV of the held block, collected since step 1

        def step(carry, _):
            d_q, held, travelling = carry
            arriving = _pass_on(held, ring.axis_name, n)
            d_q, travelling = gradients(d_q, held, travelling)
            return (d_q, arriving, _pass_on(travelling, ring.axis_name, n)), None

        if n > 2:  # steps 1 .. n-2: K/V and their dK/dV move on together
            (d_q, held, travelling), _ = jax.lax.scan(step, (d_q, held, travelling), length=n - 2)
        d_q, travelling = gradients(d_q, held, travelling)  # step n-1: the block of rank r+1
        travelling = _pass_on(travelling, ring.axis_name, n)  # ... whose dK/dV go home
        own = (travelling[0] + own[0], travelling[1] + own[1])
    return d_q.reshape(q.shape).astype(q.dtype), own[0].astype(k.dtype), own[1].astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _block_gradients(grads, q, d_out, lse, delta, k, v, visible):
    """One sub-block's contributions to (dQ part, dK part, dV part), probabilities recomputed from lse."""
    d_q, d_k, d_v = grads
    scale = 1 / jnp.sqrt(jnp.float32(q.shape[-1]))
    scores = jnp.einsum("bqkgd,bskd->bqkgs", q, k, preferred_element_type=jnp.float32) * scale
    p = jnp.where(_broadcast(visible), jnp.exp(scores - lse[..., None]), 0)
    d_v = d_v + jnp.einsum("bqkgs,bqkgd->bskd", p.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
    d_p = jnp.einsum("bqkgd,bskd->bqkgs", d_out, v, preferred_element_type=jnp.float32)
    d_s = (p * (d_p - delta[..., None]) * scale).astype(q.dtype)
    d_q = d_q + jnp.einsum("bqkgs,bskd->bqkgd", d_s, k, preferred_element_type=jnp.float32)
    d_k = d_k + jnp.einsum("bqkgs,bqkgd->bskd", d_s, q, preferred_element_type=jnp.float32)
    return d_q, d_k, d_v


# --- helpers ------------------------------------------------------------------


def _pass_on(x, axis_name: str, n: int):
    """Every array of ``x`` to the next rank of the ring (r -> r + 1 mod n): one collective-permute each."""
    return jax.lax.ppermute(x, axis_name, [(r, (r + 1) % n) for r in range(n)])


class _Part(NamedTuple):
    """Part ``index`` (traced) of ``size`` positions along a sequence dim."""

    index: jax.Array
    size: int

    def take(self, x, dim: int):
        if x is None or isinstance(x, tuple):
            return None if x is None else tuple(self.take(y, dim) for y in x)
        return jax.lax.dynamic_slice_in_dim(x, self.index * self.size, self.size, axis=dim % x.ndim)

    def put(self, x, part, dim: int):
        if isinstance(x, tuple):
            return tuple(self.put(y, p, dim) for y, p in zip(x, part))
        return jax.lax.dynamic_update_slice_in_dim(x, part, self.index * self.size, axis=dim % x.ndim)


def _parts(length: int, block_size: int) -> int:
    """How many equal parts a side of ``length`` positions is cut in: the fewest
    powers of two, at least 2, of at most ``block_size`` positions each, as
    far as ``length`` divides (1 for an odd length)."""
    parts = 1
    while length % (2 * parts) == 0 and (parts == 1 or length // parts > block_size):
        parts *= 2
    return parts


def _sub_blocks(body, carry, q_len: int, k_len: int, block_size: int):
    """``carry = body(carry, rows, cols)`` over every (query part, key part)
    sub-block of a held block, query part major: a fixed order, in one loop,
    so the body compiles once whatever the number of parts."""
    q_parts, k_parts = _parts(q_len, block_size), _parts(k_len, block_size)
    return jax.lax.fori_loop(
        0, q_parts * k_parts,
        lambda t, c: body(c, _Part(t // k_parts, q_len // q_parts), _Part(t % k_parts, k_len // k_parts)),
        carry,
    )


def _mask(ring: _Ring, rows: _Part, q_where, cols: _Part, k_where) -> jax.Array:
    """``bool [B or 1, rows, cols]``: which (query, key) pairs of the sub-block are visible."""
    (q_positions, q_segments), (k_positions, k_segments) = rows.take(q_where, -1), cols.take(k_where, -1)
    visible = attention_mask(
        q_positions, k_positions, causal=ring.causal, window=ring.window, q_segments=q_segments, k_segments=k_segments
    )
    return visible if visible.ndim == 3 else visible[None]


def _broadcast(visible: jax.Array) -> jax.Array:
    """``[B, Sq, Sk]`` -> ``[B, Sq, 1, 1, Sk]``, against scores ``[B, Sq, K, G, Sk]``."""
    return visible[:, :, None, None, :]


def _zeros_like(like: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Zeros of ``shape`` varying over the same manual axes as ``like``."""
    zeros = jnp.zeros(shape, dtype)
    varying = tuple(sorted(jax.typeof(like).mat.varying))
    return jax.lax.pcast(zeros, varying, to="varying") if varying else zeros
