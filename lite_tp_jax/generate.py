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
model's region (``pick``):

* greedy: each rank's best (value, index), then a ``pmax`` and a ``pmin`` over
  the vocabulary axes, B values each;
* temperature: the same arg-max of ``logits / T + Gumbel noise`` (Gumbel-max
  sampling); the noise is drawn for the logical vocabulary, so a seed gives the
  same tokens at any TP degree;
* top-k: each rank's k best values are all-gathered (B x k x tp values) to
  find the k-th largest;
* top-p: the one place the logits are gathered whole, once per step (an
  all-gather of B x vocab values), to sort them.

``greedy_without_cache`` is the path without a cache: every step runs the
model over the whole fixed window. Greedy generation with the cache gives the
same tokens (tested); ``benchmarks/generate.py`` compares their speed.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lite_tp_jax.collectives import all_gather
from lite_tp_jax.mesh import make_mesh_for
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.plan.rules import BATCH_AXES, padded_size
from lite_tp_jax.parallel.region import run_in_region
from lite_tp_jax.train.checkpoint import CheckpointError, Checkpointer
from lite_tp_jax.train.config import ConfigError, load_config
from lite_tp_jax.train.data import decode as decode_bytes
from lite_tp_jax.train.data import encode as encode_bytes
from lite_tp_jax.train.step import create_model_and_optimizer

SLOT_ROUNDING = 64
"""Cache slots are rounded up to a multiple of this, so nearby lengths share compiled steps."""


# --- sampling ---------------------------------------------------------------------


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
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k}.")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_max_new_tokens(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}.")
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


# --- prompts ----------------------------------------------------------------------


def left_pad(prompts: Sequence[Sequence[int]], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``[B, P]`` int32 tokens, each prompt at the end of its row, and each row's
    first slot ``start [B]``. B is padded to a multiple of ``rows`` (the
    data-parallel ranks) with one-token dummy rows."""
    if not prompts:
        raise ValueError("no prompts given; pass at least one.")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token.")
    width = max(len(p) for p in prompts)
    batch = padded_size(len(prompts), rows)
    tokens = np.zeros((batch, width), np.int32)
    start = np.full(batch, width - 1, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, width - len(prompt):] = prompt
        start[i] = width - len(prompt)
    return tokens, start


# --- the cached path ----------------------------------------------------------------


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

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, seed: int = 0) -> Iterator[np.ndarray]:
        """Yields ``max_new_tokens`` times the next token of every prompt, ``[len(prompts)]``."""
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        if max_new_tokens == 0:
            return
        tokens, start = left_pad(prompts, self.rows)
        batch, width = tokens.shape
        limit = self.model.config.max_positions if self.model.positions is not None else None
        if limit is not None and width + max_new_tokens > limit:
            raise ValueError(
                f"the longest prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's {limit} learned positions; shorten the prompt or generate fewer tokens."
            )
        slots = padded_size(width + max_new_tokens, SLOT_ROUNDING)
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
            if not np.all(np.asarray(previous_finite)):
                raise FloatingPointError(
                    f"the model's logits are not finite at new token {step}; its parameters hold NaN or inf."
                )
            yield np.asarray(previous)[: len(prompts)]


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
        token = np.asarray(next_tokens(state, jax.device_put(window, sharding), jax.device_put(lengths, sharding)))
        window[np.arange(batch), lengths] = token
        lengths += 1
        yield token[: len(prompts)]


# --- text ---------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as token ids (the tokenizer of ``lite-tp train``)."""

    def encode(self, text: str) -> list[int]:
        return encode_bytes(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return decode_bytes(np.asarray(ids, np.int32))


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def load_tokenizer(model_dir: str | os.PathLike, vocab_size: int):
    """The model directory's ``tokenizer.json`` through the ``tokenizers`` package,
    or byte-level when it has none (only for vocabularies of at most 256)."""
    path = Path(model_dir) / "tokenizer.json"
    if path.exists():
        try:
            return HFTokenizer(path)
        except ImportError:
            reason = f"{path} needs the tokenizers package (pip install tokenizers)"
    else:
        reason = f"{model_dir} has no tokenizer.json"
    if vocab_size > 256:
        raise ValueError(f"{reason}, and its vocabulary of {vocab_size} is not byte-level tokens.")
    return ByteTokenizer()


class TextStream:
    """The text each new token adds; held back while it ends in an incomplete
    character (a multi-byte UTF-8 sequence cut short decodes to U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new


def stream_text(
    model: Transformer, prompt: str, *, max_new_tokens: int, sampling: Sampling = Sampling(),
    seed: int = 0, tokenizer=None,
) -> Iterator[str]:
    """The text of each new token of ``prompt``'s continuation, as it is produced."""
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    ids = tokenizer.encode(prompt) or tokenizer.encode("\n")
    text = TextStream(tokenizer)
    for tokens in Generator(model, sampling).stream([ids], max_new_tokens, seed=seed):
        piece = text.push(tokens[0])
        if piece:
            yield piece
    rest = text.flush()
    if rest:
        yield rest


def generate(model: Transformer, prompt: str, *, max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0, tokenizer=None) -> str:
    """``prompt`` followed by its continuation of ``max_new_tokens`` tokens."""
    pieces = stream_text(model, prompt, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, tokenizer=tokenizer)
    return prompt + "".join(pieces)


# --- models to generate from -----------------------------------------------------------


def load_trained_model(run_dir: str | os.PathLike) -> Transformer:
    """The model of the latest checkpoint in ``run_dir``, restored onto the run's
    mesh without pipeline stages and without sequence parallelism (the
    parameters are the same; the KV-cache path needs neither). Writes nothing."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"No config.yaml in {run_dir}; train first with `lite-tp train CONFIG --run-dir {run_dir}`.")
    if not (run_dir / "checkpoints").is_dir():  # checked first: orbax would create the directory
        raise CheckpointError(f"No checkpoint in {run_dir / 'checkpoints'}; train first.")
    config = load_config(run_dir / "config.yaml")
    mesh = make_mesh_for({**asdict(config.mesh), "pipeline": 1})
    model_config = replace(config.model, sequence_parallel=False)
    model, optimizer = create_model_and_optimizer(model_config, config.train, mesh)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.checkpoint.keep)
    if checkpointer.latest_step() is None:
        raise CheckpointError(f"No checkpoint in {run_dir / 'checkpoints'}; train first.")
    state, _ = checkpointer.restore(nnx.state((model, optimizer)), mesh)
    nnx.update((model, optimizer), state)
    return model
