"""Packed documents: the loss and every gradient of a packed batch (segment
ids, positions restarting per document, the crossing target and prompt
tokens not counted) equal the token-weighted loss and gradients of its
documents run one by one, unpadded, on one device. At data 2 x tensor 2 with
sequence parallelism (RoPE) and at tensor 3 (learned positions, a sliding
window); without the segment ids the packed loss differs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import max_relative_error, tp_mesh
from lite_tp_jax import export_state, import_state
from lite_tp_jax.core.mesh import make_mesh
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.transformer import Transformer

VOCAB = 61
ROPE = ModelConfig(vocab_size=VOCAB, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, ffn_hidden_size=40,
                   sequence_parallel=True)
LEARNED = ModelConfig(vocab_size=VOCAB, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=6, ffn_hidden_size=40,
                      norm="layer", activation="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
                      position="learned", max_positions=16, sliding_window=4)
CASES = {"rope-data2-tp2-sp": (ROPE, dict(data=2, tensor=2)), "learned-window-tp3": (LEARNED, dict(tensor=3))}

# Rows of 12 tokens: documents of 6 and 4 tokens, two rows with 2 tokens of padding.
LAYOUT = [[6, 6], [4, 4, 4], [6, 4], [4, 6]]
PROMPT = {(0, 1): 3}  # row 0's second document is instruction data: its first 3 tokens are the prompt
S = 12


def documents():
    rng = np.random.default_rng(7)
    return [[rng.integers(0, VOCAB, n).astype(np.int32) for n in row] for row in LAYOUT]


def doc_targets(doc, prompt):
    """Next-token targets of a document alone: the last has none (-1), nor do prompt tokens."""
    targets = np.append(doc[1:], -1).astype(np.int32)
    targets[: max(prompt - 1, 0)] = -1  # targets that are prompt tokens are not trained on
    return targets


def packed_batch(docs):
    tokens, targets = np.zeros((len(docs), S), np.int32), np.full((len(docs), S), -1, np.int32)
    segments = np.zeros((len(docs), S), np.int32)
    for r, row in enumerate(docs):
        at = 0
        for d, doc in enumerate(row):
            tokens[r, at : at + len(doc)] = doc
            targets[r, at : at + len(doc)] = doc_targets(doc, PROMPT.get((r, d), 0))
            segments[r, at : at + len(doc)] = d + 1
            at += len(doc)
    return tokens, targets, segments


def loss_and_grads(model, *batch):
    graphdef, state = nnx.split(model)
    value, grads = jax.jit(jax.value_and_grad(lambda state: nnx.merge(graphdef, state).loss(*batch)[0]))(state)
    return float(value), export_state(grads)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    config, sizes = CASES[request.param]
    mesh = make_mesh(**sizes, devices=jax.devices()[: int(np.prod(list(sizes.values())))])
    model = Transformer(config, mesh=mesh, rngs=nnx.Rngs(0))
    docs = documents()
    tokens, targets, segments = packed_batch(docs)
    packed = loss_and_grads(model, jnp.asarray(tokens), jnp.asarray(targets), 1, jnp.asarray(segments))

    one = Transformer(config, mesh=tp_mesh(1), rngs=nnx.Rngs(1))
    import_state(one, export_state(model))
    by_length: dict[int, list] = {}  # each document alone; those of one length run as one batch
    for r, row in enumerate(docs):
        for d, doc in enumerate(row):
            by_length.setdefault(len(doc), []).append((doc[:-1], doc_targets(doc, PROMPT.get((r, d), 0))[:-1]))
    total, grads, counted = 0.0, None, 0
    for group in by_length.values():
        inputs, group_targets = (np.stack(a) for a in zip(*group))
        n = int((group_targets >= 0).sum())
        value, group_grads = loss_and_grads(one, jnp.asarray(inputs), jnp.asarray(group_targets))
        total += value * n
        scaled = {k: np.asarray(g, np.float64) * n for k, g in group_grads.items()}
        grads = scaled if grads is None else {k: grads[k] + scaled[k] for k in grads}
        counted += n
    assert counted == int((targets >= 0).sum())
    reference = total / counted, {k: g / counted for k, g in grads.items()}
    return request.param, model, (tokens, targets, segments), packed, reference


def test_packed_loss_and_gradients_equal_documents_run_alone(case):
    _, _, _, (loss, grads), (loss_ref, grads_ref) = case
    assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        if name.endswith("key.bias"):  # softmax ignores q . b_k (the same for every key): gradient 0 up to roundoff
            assert np.abs(g).max() <= 1e-8 and np.abs(grads_ref[name]).max() <= 1e-8
            continue
        assert max_relative_error(g, grads_ref[name]) <= 1e-5, name


def test_without_segment_ids_the_packed_loss_differs(case):
    _, model, (tokens, targets, _), _, (loss_ref, _) = case
    graphdef, state = nnx.split(model)
    unmasked = float(jax.jit(lambda state: nnx.merge(graphdef, state).loss(jnp.asarray(tokens), jnp.asarray(targets))[0])(state))
    assert abs(unmasked - loss_ref) > 1e-3 * abs(loss_ref)
