"""Rotary position embeddings (RoPE), in the Llama / Hugging Face layout.

A head vector ``x`` of size ``d`` is split into halves ``x1 = x[:d/2]`` and
``x2 = x[d/2:]``; the pair ``(x1[i], x2[i])`` is rotated by the angle
``position * inv_freq[i]`` with ``inv_freq[i] = theta ** (-2i / d)``:

    x' = x * cos + rotate_half(x) * sin,    rotate_half(x) = concat(-x2, x1)

where ``cos`` and ``sin`` hold the ``d/2`` angles twice (once per half). This is
the half-split layout of Hugging Face's ``apply_rotary_pos_emb``, which
checkpoints converted to Hugging Face use; it is *not* the interleaved layout
(pairs ``(x[2i], x[2i+1])``) of the RoFormer paper and Meta's reference code.

``RopeScaling`` stretches the wavelengths for contexts longer than the
training one, as Hugging Face's ``rope_type`` "linear" (every frequency divided
by ``factor``) and "llama3" (low frequencies divided, high ones kept, a smooth
blend in between).

RoPE acts on each head separately, so it needs no communication: a rank applies
it to the heads it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class RopeScaling:
    """``kind`` "linear": ``inv_freq / factor``. "llama3" (Llama 3.1): with
    ``wavelength = 2 pi / inv_freq``, divide by ``factor`` where wavelength >
    ``original_max_positions / low_freq_factor``, keep where wavelength <
    ``original_max_positions / high_freq_factor``, and in between blend
    ``(1 - s) inv_freq / factor + s inv_freq`` with
    ``s = (original_max_positions / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)``."""

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def apply(self, inv_freq: jax.Array) -> jax.Array:
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind != "llama3":
            raise ValueError(f"RopeScaling kind must be 'linear' or 'llama3', got {self.kind!r}.")
        wavelength = 2 * math.pi / inv_freq
        context = self.original_max_positions
        low, high = self.low_freq_factor, self.high_freq_factor
        smooth = (context / wavelength - low) / (high - low)
        blended = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        scaled = jnp.where(wavelength > context / low, inv_freq / self.factor, inv_freq)
        medium = (wavelength >= context / high) & (wavelength <= context / low)
        return jnp.where(medium, blended, scaled)


def rotary_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """``1 / theta ** (arange(0, head_dim, 2) / head_dim)`` (then ``scaling``),
    float32, shape ``[head_dim // 2]``."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    return inv_freq if scaling is None else scaling.apply(inv_freq)


def rotate_half(x: jax.Array) -> jax.Array:
    """``concat(-x2, x1)`` of the two halves of the last dimension."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(
    x: jax.Array, positions: jax.Array, theta: float, scaling: RopeScaling | None = None
) -> jax.Array:
    """Rotates ``x`` ``[B, S, heads, head_dim]`` by its ``positions``.

    ``positions``: integer positions ``[S]`` (shared by the batch) or ``[B, S]``.
    The angles are computed in float32; the result has ``x``'s dtype.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"apply_rotary needs an even head_dim, got x of shape {tuple(x.shape)}.")
    angles = positions.astype(jnp.float32)[..., None] * rotary_inverse_frequencies(head_dim, theta, scaling)
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # [..., S, 1, head_dim]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    return x * cos + rotate_half(x) * sin
