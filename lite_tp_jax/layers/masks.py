"""Which keys a query attends to: the one place attention masks are built.

A query at global position ``i`` sees a key at global position ``j`` when

    causal:          j <= i                    (without ``causal``: any j)
    sliding window:  i - j < window            (|i - j| < window without ``causal``;
                                                Mistral's and Qwen2's ``sliding_window``)
    segments:        segment[i] == segment[j]  (packed documents: never across a boundary)

Positions are global (indices in the whole sequence, or cache slots), so the
mask of any (query block, key block) pair is the same function of the blocks'
positions: the full ``[S, S]`` square for one device, a KV cache's
``[new tokens, slots]`` strip, or, later, a context-parallel rank's block.
``attention_mask`` builds it as booleans (the ``reference`` kernel and the KV
cache decode apply it); ``dot_product_arguments`` says the same thing in
``jax.nn.dot_product_attention``'s terms (``is_causal`` and
``local_window_size``, which the fused kernels apply without materialising
``[S, S]``; only the segment part is passed as a ``mask``).

Segment ids also restart the positions that RoPE and learned position
embeddings see (``segment_positions``): each packed document starts at 0,
exactly as if it ran alone. Pure functions, no communication; the sequence
must be whole (with sequence parallelism the attention core sees the
gathered sequence, and the segment ids are replicated over "tensor").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def attention_mask(
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    causal: bool = True,
    window: int | None = None,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
) -> jax.Array:
    """``bool [..., Sq, Sk]``: True where query ``q_positions[..., a]`` may attend to key ``k_positions[..., b]``.

    ``q_positions``: ``[Sq]`` or ``[B, Sq]`` integer global positions (``k_positions`` likewise);
    ``q_segments`` / ``k_segments``: segment ids of the same shapes (both or neither).
    The leading dims broadcast: ``[Sq]`` and ``[Sk]`` give ``[Sq, Sk]``, a ``[B, ...]`` one ``[B, Sq, Sk]``.
    """
    if (q_segments is None) != (k_segments is None):
        raise ValueError("attention_mask needs both q_segments and k_segments, or neither.")
    if window is not None and window < 1:
        raise ValueError(f"attention_mask window must be >= 1 (keys within window - 1 positions), got {window}.")
    q = jnp.asarray(q_positions)[..., :, None]
    k = jnp.asarray(k_positions)[..., None, :]
    distance = q - k  # [..., Sq, Sk]
    visible = jnp.ones(distance.shape, bool)
    if causal:
        visible &= distance >= 0
    if window is not None:
        visible &= (distance < window) if causal else (jnp.abs(distance) < window)
    if q_segments is not None:
        visible &= jnp.asarray(q_segments)[..., :, None] == jnp.asarray(k_segments)[..., None, :]
    return visible


def dot_product_arguments(
    q_len: int, k_len: int, *, causal: bool = True, window: int | None = None, segments: jax.Array | None = None
) -> dict[str, Any]:
    """``attention_mask`` of self-attention over positions ``0..S-1`` as keyword
    arguments of ``jax.nn.dot_product_attention``: ``is_causal`` and
    ``local_window_size`` (``(window - 1, 0)``: the window includes the query
    itself), and the segment part as a ``[B, 1, Sq, Sk]`` boolean ``mask``
    (``segments``: ``[B, S]``, for queries and keys alike)."""
    arguments: dict[str, Any] = {"is_causal": causal}
    if window is not None:
        arguments["local_window_size"] = (window - 1, 0 if causal else window - 1)
    if segments is not None:
        positions = (jnp.arange(q_len), jnp.arange(k_len))
        mask = attention_mask(*positions, causal=False, q_segments=segments, k_segments=segments)
        arguments["mask"] = mask[:, None]
    return arguments


def segment_positions(segments: jax.Array) -> jax.Array:
    """Positions that restart at 0 where the segment id changes along the last
    dim: ``[1, 1, 2, 2, 2, 0]`` -> ``[0, 1, 0, 1, 2, 0]`` (int32, ``segments``' shape)."""
    index = jnp.arange(segments.shape[-1], dtype=jnp.int32)
    changes = jnp.concatenate(
        [jnp.ones(segments.shape[:-1] + (1,), bool), segments[..., 1:] != segments[..., :-1]], axis=-1
    )
    starts = jax.lax.cummax(jnp.where(changes, index, 0), axis=segments.ndim - 1)
    return index - starts
