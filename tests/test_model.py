"""The Llama-style model: communication per block, remat, and memory per device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import max_relative_error, model_loss_and_grads, tp_mesh
from lite_tp_jax import export_state, make_mesh
from lite_tp_jax.core.hlo import summary
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.blocks import Block
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.run.config_file import load_config
from lite_tp_jax.run.optimizer import create_model_and_optimizer

SMALL = ModelConfig(
    vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=40, sequence_parallel=False
)
B, S = 2, 8


def block_forward_collectives(sequence_parallel: bool) -> dict[str, list[int]]:
    config = dataclasses.replace(SMALL, sequence_parallel=sequence_parallel)
    block = Block(config, mesh=tp_mesh(4), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    x = jnp.ones((B, S, config.hidden_size))
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return summary(forward.lower(state, x).compile().as_text())


def test_block_forward_two_all_reduces_without_sequence_parallel():
    assert block_forward_collectives(False) == {"all-reduce": [B * S * 32] * 2}


def test_block_forward_gathers_and_scatters_with_sequence_parallel():
    assert block_forward_collectives(True) == {
        "all-gather": [B * S * 32] * 2,
        "reduce-scatter": [B * S * 32 // 4] * 2,
    }


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.integers(0, SMALL.vocab_size, (B, S + 1)), jnp.int32)


def loss_and_grads(config, mesh, tokens, weights=None):
    return model_loss_and_grads(config, mesh, tokens, weights)[1:]


MOE_GROUP = dataclasses.replace(SMALL, num_layers=4, moe_every=2, num_experts=4, sequence_parallel=True)  # 2 x (dense, MoE)


@pytest.mark.parametrize("config", [SMALL, MOE_GROUP], ids=["dense", "moe-group-sp"])
def test_remat_changes_no_gradient_and_no_collective(tokens, config):
    """Every policy gives the same gradients with the same collectives, and
    none reruns a reduction: with SP, 2 reduce-scatters of [b, s/t, h] per
    block each way in the scanned layer group, plus the embedding's and the
    head's (a block that did not keep its input would rerun its predecessor's)."""
    mesh = tp_mesh(4)
    loss, grads, collectives = loss_and_grads(config, mesh, tokens)
    if config.sequence_parallel:
        blocks_per_group = config.moe_every
        assert collectives["reduce-scatter"] == [B * S * config.hidden_size // 4] * (4 * blocks_per_group + 2)
    for remat in ("full", "selective"):
        loss_r, grads_r, collectives_r = loss_and_grads(dataclasses.replace(config, remat=remat), mesh, tokens)
        assert abs(loss_r - loss) <= 1e-6 * abs(loss)
        for name in grads:
            assert max_relative_error(grads_r[name], grads[name]) <= 1e-5, (remat, name)
        assert {k: sorted(v) for k, v in collectives_r.items()} == {k: sorted(v) for k, v in collectives.items()}


@pytest.mark.parametrize("tp, sequence_parallel, tie", [(3, False, True), (8, False, False), (2, True, True)])
def test_model_matches_one_device(tokens, tp, sequence_parallel, tie):
    """Loss and every gradient at TP t equal the same weights on one device."""
    config = dataclasses.replace(SMALL, tie_embeddings=tie)
    loss_1, grads_1, _ = loss_and_grads(config, tp_mesh(1), tokens)
    weights = export_state(Transformer(config, mesh=tp_mesh(1), rngs=nnx.Rngs(0)))
    sharded = dataclasses.replace(config, sequence_parallel=sequence_parallel)
    loss_t, grads_t, _ = loss_and_grads(sharded, tp_mesh(tp), tokens, weights)
    assert abs(loss_t - loss_1) <= 1e-5 * abs(loss_1)
    for name in grads_1:
        assert max_relative_error(grads_t[name], grads_1[name]) <= 1e-5, name


def test_llama_8b_memory_per_device_at_tp8():
    """Parameters + AdamW moments per device at TP 8 are total/8 plus the
    replicated norms, within 2%; computed from shapes only (nothing allocated)."""
    config = load_config("configs/llama-8b.yaml", ["mesh.data=1", "mesh.tensor=8"])
    mesh = make_mesh(tensor=8)
    model, optimizer = nnx.eval_shape(lambda: create_model_and_optimizer(config.model, config.train, mesh))
    per_device = total = replicated = 0
    for _, variable in nnx.to_flat_state(nnx.state((model, optimizer))):
        spec = P(*(variable.get_metadata().get("out_sharding") or ()))
        nbytes = int(np.prod(variable.shape)) * variable.dtype.itemsize
        shard = NamedSharding(mesh, spec).shard_shape(variable.shape)
        per_device += int(np.prod(shard)) * variable.dtype.itemsize
        total += nbytes
        if "tensor" not in jax.tree.leaves(tuple(spec)):
            replicated += nbytes
    params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert 7.9e9 < params < 8.1e9  # it is an 8B model
    expected = (total - replicated) / 8 + replicated
    assert abs(per_device - expected) <= 0.02 * expected
    assert replicated < 0.001 * total  # only norms (and step counters) are replicated
