"""Rotary position embeddings (RoPE), in the Llama / Hugging Face layout.

A head vector ``x`` of size ``d`` is split into halves ``x1 = x[:d/2]`` and
``x2 = x[d/2:]``; the pair ``(x1[i], x2[i])`` is rotated by the angle
``position * inv_freq[i]`` with ``inv_freq[i] = theta ** (-2i / d)``:

    x' = x * cos + rotate_half(x) * sin,    rotate_half(x) = concat(-x2, x1)

where ``cos`` and ``sin`` hold the ``d/2`` angles twice (once per half). This is
the half-split layout of Hugging Face's ``apply_rotary_pos_emb``, which
checkpoints converted to Hugging Face use; it is *not* the interleaved layout
(pairs ``(x[2i], x[2i+1])``) of the RoFormer paper and Meta's reference code.

RoPE acts on each head separately, so it needs no communication: a rank applies
it to the heads it holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    """``1 / theta ** (arange(0, head_dim, 2) / head_dim)``, float32, shape ``[head_dim // 2]``."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def rotate_half(x: jax.Array) -> jax.Array:
    """``concat(-x2, x1)`` of the two halves of the last dimension."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates ``x`` ``[B, S, heads, head_dim]`` by its ``positions``.

    ``positions``: integer positions ``[S]`` (shared by the batch) or ``[B, S]``.
    The angles are computed in float32; the result has ``x``'s dtype.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"apply_rotary needs an even head_dim, got x of shape {tuple(x.shape)}.")
    angles = positions.astype(jnp.float32)[..., None] * rotary_inverse_frequencies(head_dim, theta)
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # [..., S, 1, head_dim]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    return x * cos + rotate_half(x) * sin
