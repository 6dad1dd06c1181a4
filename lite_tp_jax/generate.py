"""Sampling from a trained run: greedy or with a temperature.

Each new token runs the model on a fixed window of ``train.seq_len`` tokens
(the prompt and what was generated so far, the newest at the end), so one
compiled forward serves every step. The logits stay split over the vocabulary
until the sampler picks a token.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lite_tp_jax.mesh import make_mesh_for
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.train.checkpoint import CheckpointError, Checkpointer
from lite_tp_jax.train.config import ConfigError, load_config
from lite_tp_jax.train.data import decode, encode
from lite_tp_jax.train.step import create_model_and_optimizer


def load_trained_model(run_dir: str | os.PathLike) -> tuple[Transformer, int]:
    """The model of the latest checkpoint in ``run_dir`` and its window length."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"No config.yaml in {run_dir}; train first with `lite-tp train CONFIG --run-dir {run_dir}`.")
    config = load_config(run_dir / "config.yaml")
    mesh = make_mesh_for(asdict(config.mesh))
    model, optimizer = create_model_and_optimizer(config.model, config.train, mesh)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.checkpoint.keep)
    if checkpointer.latest_step() is None:
        raise CheckpointError(f"No checkpoint in {run_dir / 'checkpoints'}; train first.")
    state, _ = checkpointer.restore(nnx.state((model, optimizer)), mesh)
    nnx.update((model, optimizer), state)
    return model, config.train.seq_len


def generate(
    model: Transformer, window: int, prompt: str, *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0
) -> str:
    """``prompt`` followed by ``max_new_tokens`` sampled bytes, decoded as UTF-8."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
    tokens = list(encode(prompt)) or [ord("\n")]
    graphdef, state = nnx.split(model)
    rows = math.prod(model.mesh.shape[axis] for axis in model.batch_axes)  # one row per data-parallel rank

    @jax.jit
    def next_token(state, window_tokens, length, key):
        batch = jnp.broadcast_to(window_tokens, (rows, window))
        logits = nnx.merge(graphdef, state)(batch)[0, length - 1]
        if temperature == 0:
            return jnp.argmax(logits)
        return jax.random.categorical(key, logits / temperature)

    key = jax.random.key(seed)
    for _ in range(max_new_tokens):
        recent = tokens[-window:]
        buffer = np.zeros(window, np.int32)
        buffer[: len(recent)] = recent
        key, sample_key = jax.random.split(key)
        tokens.append(int(next_token(state, buffer, len(recent), sample_key)))
    return decode(np.asarray(tokens))
