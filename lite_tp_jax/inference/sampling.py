"""Picking the next token from logits split over the vocabulary, inside the
model's region, without gathering them whole (except for top-p).

* greedy: each rank's best (value, index), then a ``pmax`` and a ``pmin`` over
  the vocabulary axes, B values each;
* temperature: the same arg-max of ``logits / T + Gumbel noise`` (Gumbel-max
  sampling); the noise is drawn for the logical vocabulary, so a seed gives the
  same tokens at any TP degree;
* top-k: each rank's k best values are all-gathered (B x k x tp values) to
  find the k-th largest;
* top-p: the one place the logits are gathered whole, once per step (an
  all-gather of B x vocab values), to sort them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from lite_tp_jax.core.collectives import all_gather
from lite_tp_jax.core.errors import BadInput


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy (``temperature=0``), or sampled from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely
    tokens (0: all) and then to the smallest set holding ``top_p`` of the mass."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise BadInput(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise BadInput(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k}.")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise BadInput(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_max_new_tokens(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise BadInput(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}.")
    return int(max_new_tokens)


def _split_argmax(z: jax.Array, index: jax.Array, axes) -> jax.Array:
    """Global arg-max over the vocabulary split over ``axes``: ``z`` is this rank's
    ``[B, V_i]`` slice, ``index`` its global token ids. The lowest id wins ties."""
    best = jax.lax.pmax(z.max(-1), axes)
    candidates = jnp.where(z == best[:, None], index, jnp.iinfo(jnp.int32).max)
    return jax.lax.pmin(candidates.min(-1), axes)


def pick(logits: jax.Array, noise: jax.Array | None, sampling: Sampling, vocab_size: int, axes) -> tuple[jax.Array, jax.Array]:
    """Next tokens ``[B]`` (the same on every rank) from this rank's logits slice
    ``[B, V_i]`` of a vocabulary split over ``axes``; and whether every row's
    logits were finite. ``noise``: this rank's slice of Gumbel noise (sampling)."""
    local = logits.shape[-1]
    index = jax.lax.axis_index(axes) * local + jnp.arange(local, dtype=jnp.int32)
    finite = jax.lax.pmin(jnp.isfinite(logits).all(-1).astype(jnp.int32), axes) > 0
    z = jnp.where(index < vocab_size, logits.astype(jnp.float32), -jnp.inf)
    if sampling.greedy:
        return _split_argmax(z, index, axes), finite
    z = z / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, vocab_size)
        mine = jax.lax.top_k(z, min(k, local))[0]
        kth = jax.lax.top_k(all_gather(mine, axes, dim=-1), k)[0][:, -1:]
        z = jnp.where(z >= kth, z, -jnp.inf)
    if sampling.top_p < 1:
        ranked = -jnp.sort(-all_gather(z, axes, dim=-1), axis=-1)  # the whole vocabulary, best first
        probs = jax.nn.softmax(ranked, axis=-1)
        kept = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p  # mass before a token < p: always the best
        threshold = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z >= threshold, z, -jnp.inf)
    return _split_argmax(z + noise, index, axes), finite
