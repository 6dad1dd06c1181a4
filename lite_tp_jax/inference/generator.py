"""Generation with a KV cache, tensor-parallel: prefill once, then one token per step.

    prompts -> left-padded [B, P], row b starting at slot start[b]
    prefill    model.local_decode(prompts, cursor=0)  -> cache slots 0..P-1, logits of slot P-1
    decode     model.local_decode(token,  cursor=t)   -> cache slot t,        logits of slot t
    pick       next token from this rank's vocabulary slice (below)

The cache (``Transformer.new_cache``) is ``[groups, blocks, B, slots, kv heads,
head_dim]`` per key and value, its kv heads split over "tensor" like the
attention layers split them (replicated when ``num_kv_heads < tp``) and its
rows over "data" x "expert". ``slots`` is fixed for a call (the prompt plus the
new tokens, rounded up to ``SLOT_ROUNDING``), so one compiled decode step
serves every position; the cache buffers are donated and updated in place.

The logits stay split over the vocabulary until a token is picked, inside the
model's region (``sampling.pick``).

``greedy_without_cache`` is the path without a cache: every step runs the
model over the whole fixed window. Greedy generation with the cache gives the
same tokens (tested); ``benchmarks/generate.py`` compares their speed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lite_tp_jax.core.axes import BATCH_AXES
from lite_tp_jax.core.errors import BadInput
from lite_tp_jax.inference.sampling import Sampling, check_max_new_tokens, pick
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.parallel.region import run_in_region
from lite_tp_jax.runtime.devices import check_fits_memory
from lite_tp_jax.sharding.rules import padded_size

SLOT_ROUNDING = 64
"""Cache slots are rounded up to a multiple of this, so nearby lengths share compiled steps."""


# --- prompts ----------------------------------------------------------------------


def left_pad(prompts: Sequence[Sequence[int]], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``[B, P]`` int32 tokens, each prompt at the end of its row, and each row's
    first slot ``start [B]``. B is padded to a multiple of ``rows`` (the
    data-parallel ranks) with one-token dummy rows."""
    if not prompts:
        raise BadInput("no prompts given; pass at least one.")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise BadInput(f"prompt {i} is empty; every prompt needs at least one token.")
    width = max(len(p) for p in prompts)
    batch = padded_size(len(prompts), rows)
    tokens = np.zeros((batch, width), np.int32)
    start = np.full(batch, width - 1, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, width - len(prompt):] = prompt
        start[i] = width - len(prompt)
    return tokens, start


@functools.lru_cache(maxsize=32)
def _compiled_step(graphdef, sampling: Sampling, padded_vocab: int):
    """The jitted prefill/decode step for one model structure and sampling (shared
    by every Generator of it, so each shape compiles once per process)."""

    def step(state, tokens, cursor, start, cache, key):
        """Extends the rows by ``tokens`` at ``cursor``; returns (next tokens, finite, cache)."""
        model = nnx.merge(graphdef, state)
        rows, vocab, vocab_size = P(model.batch_axes), model.vocab_axes, model.config.vocab_size

        def body(model, tokens, cursor, start, cache, *noise):
            logits, cache = model.local_decode(tokens, cursor, start, cache)
            token, finite = pick(logits, noise[0] if noise else None, sampling, vocab_size, vocab)
            return token, finite, cache

        args, specs = [tokens, cursor, start, cache], [rows, P(), rows, model.cache_spec]
        if not sampling.greedy:  # Gumbel noise for the logical vocabulary, drawn shard by shard
            noise = jax.random.gumbel(key, (tokens.shape[0], vocab_size), jnp.float32)
            noise = jnp.pad(noise, ((0, 0), (0, padded_vocab - vocab_size)))
            args.append(jax.lax.with_sharding_constraint(noise, NamedSharding(model.mesh, P(model.batch_axes, vocab))))
            specs.append(P(model.batch_axes, vocab))
        return run_in_region(
            model, body, *args, mesh=model.mesh, arg_specs=tuple(specs), out_specs=(rows, rows, model.cache_spec),
            row_axes=model.batch_axes, axes=model.axes,
        )

    return jax.jit(step, donate_argnames=("cache",))


class Generator:
    """Compiled prefill and decode steps of ``model`` for one ``sampling``.

    ``stream(prompts, max_new_tokens)`` yields the next token of every prompt,
    one step at a time. Compiles once per (batch, prompt width) for the prefill
    and once per (batch, slots) for the decode step."""

    def __init__(self, model: Transformer, sampling: Sampling = Sampling()):
        self.model, self.sampling = model, sampling
        graphdef, self.state = nnx.split(model)
        self.rows = math.prod(model.mesh.shape[axis] for axis in BATCH_AXES)
        head = model.embed if model.head is None else model.head
        self._step = _compiled_step(graphdef, sampling, head.embedding.shape[0])

    def _check_cache_fits(self, batch: int, slots: int, max_new_tokens: int) -> None:
        check_fits_memory(
            _cache_bytes_per_device(self.model, batch, slots), f"a KV cache for {max_new_tokens} new tokens",
            "generate fewer tokens (--max-new-tokens) or split the model over more devices (--tensor)",
        )

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, seed: int = 0) -> Iterator[np.ndarray]:
        """Yields ``max_new_tokens`` times the next token of every prompt, ``[len(prompts)]``."""
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        if max_new_tokens == 0:
            return
        tokens, start = left_pad(prompts, self.rows)
        batch, width = tokens.shape
        limit = self.model.config.max_positions if self.model.positions is not None else None
        if limit is not None and width + max_new_tokens > limit:
            raise BadInput(
                f"the longest prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's {limit} learned positions; shorten the prompt or generate fewer tokens."
            )
        slots = padded_size(width + max_new_tokens, SLOT_ROUNDING)
        self._check_cache_fits(batch, slots, max_new_tokens)
        sharding = NamedSharding(self.model.mesh, P(self.model.batch_axes))
        start = jax.device_put(start, sharding)
        cache = self.model.new_cache(batch, slots)
        key = jax.random.key(seed)
        token, finite, cache = self._step(
            self.state, jax.device_put(tokens, sharding), jnp.int32(0), start, cache, jax.random.fold_in(key, 0)
        )
        for step in range(1, max_new_tokens + 1):
            previous, previous_finite = token, finite
            if step < max_new_tokens:  # dispatch the next step before waiting for this one's tokens
                token, finite, cache = self._step(
                    self.state, previous[:, None], jnp.int32(width + step - 1), start, cache,
                    jax.random.fold_in(key, step),
                )
            if not np.all(_on_host(previous_finite)):
                raise FloatingPointError(
                    f"the model's logits are not finite at new token {step}; its parameters hold NaN or inf."
                )
            yield _on_host(previous)[: len(prompts)]


def _cache_bytes_per_device(model: Transformer, batch: int, slots: int) -> int:
    """Bytes of the KV cache (keys and values) each device holds, from the cache's own sharding."""
    sharding = NamedSharding(model.mesh, model.cache_spec)
    abstract = jax.eval_shape(lambda: model.new_cache(batch, slots))
    return sum(math.prod(sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in abstract)


def _on_host(x: jax.Array) -> np.ndarray:
    """The whole of ``x`` as numpy, also when its rows lie in other processes."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --- the path without a cache ------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _compiled_forward(graphdef):
    """Greedy next tokens of right-padded rows from a forward over the whole window."""

    @jax.jit
    def next_tokens(state, window, lengths):
        logits = nnx.merge(graphdef, state)(window)
        return jnp.argmax(jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], axis=-1)

    return next_tokens


def greedy_without_cache(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Iterator[np.ndarray]:
    """Greedy generation that runs the model over the whole window
    ``[B, longest prompt + max_new_tokens]`` for every new token (rows
    right-padded, each at its own length; one compiled forward)."""
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    rows = math.prod(model.mesh.shape[axis] for axis in BATCH_AXES)
    batch = padded_size(len(prompts), rows)
    window = np.zeros((batch, max(len(p) for p in prompts) + max_new_tokens), np.int32)
    lengths = np.ones(batch, np.int32)
    for i, prompt in enumerate(prompts):
        window[i, : len(prompt)], lengths[i] = prompt, len(prompt)
    graphdef, state = nnx.split(model)
    next_tokens = _compiled_forward(graphdef)
    sharding = NamedSharding(model.mesh, P(model.batch_axes))
    for _ in range(max_new_tokens):
        token = _on_host(next_tokens(state, jax.device_put(window, sharding), jax.device_put(lengths, sharding)))
        window[np.arange(batch), lengths] = token
        lengths += 1
        yield token[: len(prompts)]
