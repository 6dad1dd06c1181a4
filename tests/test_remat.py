"""Remat policies: what a layer keeps, measured on the compiled step against
the adapted Korthikanti formula (benchmarks/activation_memory.py has the full
table), and with sequence parallelism the kept tensors are the sequence shards."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from lite_tp_jax.models.config import ModelConfig

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCHMARKS))  # activation_memory imports its sibling report.py
_spec = importlib.util.spec_from_file_location("activation_memory", _BENCHMARKS / "activation_memory.py")
activation_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(activation_memory)

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_hidden_size=40, attention="reference"
)
TP, BATCH, SEQ = 2, 2, 64


def per_layer_bytes(config: ModelConfig) -> float:
    low, high = (
        activation_memory.temp_bytes(dataclasses.replace(config, num_layers=depth), TP, BATCH, SEQ) for depth in (2, 4)
    )
    return (high - low) / 2


@pytest.mark.parametrize(
    "sequence_parallel, remat", [(False, "none"), (True, "selective")], ids=["tp-only-none", "sp-selective"]
)
def test_kept_activations_match_the_formula(sequence_parallel, remat):
    """TP only without remat keeps 4 replicated [s, b, h] tensors, the matmul
    inputs split over heads / ffn and the softmax; SP + selective keeps all of
    it but the softmax at 1/t of the sequence. Within 10% of the formula."""
    config = dataclasses.replace(CONFIG, sequence_parallel=sequence_parallel, remat=remat)
    measured = per_layer_bytes(config)
    expected = activation_memory.formula(config, TP, BATCH, SEQ)
    assert abs(measured / expected - 1) <= 0.1, (measured, expected)


def test_sequence_parallel_regathers_in_the_backward():
    """With SP the kept norm outputs are sequence shards, so the backward runs
    each layer's two all-gathers again (Megatron's choice): per layer and step
    6 all-gathers of [b, s, h] (2 forward, 2 re-gathers, 2 backward of the
    reduce-scatters) and 4 reduce-scatters, whatever the remat setting; no
    all-reduce of activations."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from conftest import tp_mesh
    from lite_tp_jax.core.hlo import collectives_per_step
    from lite_tp_jax.models.transformer import Transformer

    layers = 2
    config = dataclasses.replace(CONFIG, sequence_parallel=True, num_layers=layers, remat="selective")
    model = nnx.eval_shape(lambda: Transformer(config, mesh=tp_mesh(TP), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    grad = jax.jit(jax.grad(lambda state, t: nnx.merge(graphdef, state).loss(t, t)[0]))
    counts = {}
    for collective, runs in collectives_per_step(grad.lower(state, tokens).compile().as_text()):
        if collective.elements in (BATCH * SEQ * CONFIG.hidden_size, BATCH * SEQ * CONFIG.hidden_size // TP):
            counts[collective.kind] = counts.get(collective.kind, 0) + runs
    # embedding lookup, head: one reduce-scatter and one all-gather each way more
    assert counts == {"all-gather": 6 * layers + 2, "reduce-scatter": 4 * layers + 2}, counts
