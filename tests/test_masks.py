"""Attention masks (layers/masks.py): causal, sliding window and document
segments, at every kernel that runs on CPU against a dense numpy reference
written with loops; the KV-cache decode with a sliding window against the
path without a cache, beyond the window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import max_relative_error, tp_mesh
from lite_tp_jax.inference.generator import left_pad
from lite_tp_jax.layers.attention import attention_core
from lite_tp_jax.layers.masks import attention_mask, segment_positions
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.transformer import Transformer

B, S = 2, 9
SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 2, 3, 3, 3, 3, 0, 0]], np.int32)


def dense_mask(causal, window, segments):
    """[B, S, S] booleans, one query and key at a time."""
    mask = np.zeros((B, S, S), bool)
    for b in range(B):
        for i in range(S):
            for j in range(S):
                seen = j <= i if causal else True
                if window is not None:
                    seen &= (i - j < window) if causal else (abs(i - j) < window)
                if segments is not None:
                    seen &= segments[b, i] == segments[b, j]
                mask[b, i, j] = seen
    return mask


def dense_attention(q, k, v, mask):
    """float64 softmax attention, query head n on kv head n // (N / K)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, S, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((B, S, 2, 8)).astype(np.float32) for _ in range(2))
    return q, k, v


MASKS = {  # (causal, window, segments)
    "causal": (True, None, None),
    "window": (True, 3, None),
    "segments": (True, None, SEGMENTS),
    "window-segments": (True, 2, SEGMENTS),
    "bidirectional-window-segments": (False, 3, SEGMENTS),
}


@pytest.mark.parametrize("name", MASKS)
def test_mask_builder_equals_dense_loops(name):
    causal, window, segments = MASKS[name]
    positions = np.arange(S)
    segs = None if segments is None else jnp.asarray(segments)
    got = attention_mask(positions, positions, causal=causal, window=window, q_segments=segs, k_segments=segs)
    expected = dense_mask(causal, window, segments)
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), expected.shape), expected)


@pytest.mark.parametrize("kernel", ("reference", "xla", "auto"))
@pytest.mark.parametrize("name", MASKS)
def test_every_kernel_equals_dense_reference(qkv, kernel, name):
    """Values against float64 loops; gradients against the reference kernel's."""
    causal, window, segments = MASKS[name]
    segs = None if segments is None else jnp.asarray(segments)
    core = lambda q, k, v, kernel: attention_core(q, k, v, kernel, causal=causal, window=window, segments=segs)  # noqa: E731
    out = core(*qkv, kernel)
    assert max_relative_error(out, dense_attention(*qkv, dense_mask(causal, window, segments))) <= 1e-5
    if kernel == "reference":
        return
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(out.shape), jnp.float32)
    grads = jax.vjp(lambda *a: core(*a, kernel), *qkv)[1](cotangent)
    grads_ref = jax.vjp(lambda *a: core(*a, "reference"), *qkv)[1](cotangent)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert max_relative_error(g, g_ref) <= 1e-5


def test_masks_change_the_result(qkv):
    """The cases above are not all the same computation."""
    outs = [np.asarray(attention_core(*qkv, "xla", causal=c, window=w, segments=None if s is None else jnp.asarray(s)))
            for c, w, s in MASKS.values()]
    for i in range(len(outs)):
        for j in range(i):
            assert np.abs(outs[i] - outs[j]).max() > 1e-3, (i, j)


def test_segment_positions_restart_per_document():
    np.testing.assert_array_equal(
        segment_positions(jnp.asarray(SEGMENTS)),
        [[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 0, 0, 1, 2, 3, 0, 1]],
    )


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window must be >= 1"):
        attention_mask(np.arange(3), np.arange(3), window=0)


# --- the KV cache with a sliding window ----------------------------------------

WINDOW = 3
SLIDING = ModelConfig(vocab_size=61, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, ffn_hidden_size=40,
                      sliding_window=WINDOW)
PROMPTS = [[5, 17, 33, 2, 40], [7], [60, 1, 9]]
FED = np.random.default_rng(3).integers(0, 61, (len(PROMPTS), 5)).astype(np.int32)  # decoded tokens, fixed


def test_cached_decode_with_sliding_window_equals_no_cache_path():
    """Prefill and five decode steps (rows run up to 10 tokens, past the
    window of 3) give the logits of the whole right-padded window run
    without a cache, within 1e-5; and those differ from the same weights
    without the window."""
    model = Transformer(SLIDING, mesh=tp_mesh(1), rngs=nnx.Rngs(0))
    rows = [prompt + fed.tolist() for prompt, fed in zip(PROMPTS, FED)]
    window = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for row, tokens in enumerate(rows):
        window[row, : len(tokens)] = tokens
    expected = np.asarray(model(jnp.asarray(window)))

    tokens, start = left_pad(PROMPTS, 1)
    width = tokens.shape[1]
    cache = model.new_cache(tokens.shape[0], width + FED.shape[1])
    logits, cache = model.prefill(jnp.asarray(tokens), jnp.asarray(start), cache)
    steps = [logits]
    decode = nnx.jit(lambda model, *args: model.decode(*args))  # one compile for every step
    for step in range(FED.shape[1] - 1):
        logits, cache = decode(model, jnp.asarray(FED[:, step : step + 1]), jnp.int32(width + step), jnp.asarray(start), cache)
        steps.append(logits)
    for row, prompt in enumerate(PROMPTS):
        for step, logits in enumerate(steps):
            want = expected[row, len(prompt) - 1 + step]
            assert max_relative_error(np.asarray(logits)[row], want) <= 1e-5, (row, step)

    model.layers.blocks[0].attention.sliding_window = None  # same weights, whole causal prefix
    unwindowed = np.asarray(model(jnp.asarray(window)))
    np.testing.assert_allclose(unwindowed[:, :WINDOW], expected[:, :WINDOW], rtol=1e-5, atol=1e-5)
    assert np.abs(unwindowed[0, WINDOW:] - expected[0, WINDOW:]).max() > 1e-3
