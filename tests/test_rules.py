"""The partitioning rule table: every spec comes from it, overrides change the
layout (not the math), bad overrides are one-sentence errors. (Parameters
stored split over "data": tests/test_shard_optimizer.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import max_relative_error, model_loss_and_grads, tp_mesh
from lite_tp_jax import export_state, make_mesh
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.sharding.rules import MEGATRON, PartitionRules
from lite_tp_jax.sharding.table import STRATEGIES
from lite_tp_jax.sharding.state import flat_variables
from lite_tp_jax.run.config import ConfigError
from lite_tp_jax.run.config_file import parse_config

SMALL = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=40)
MOE = dataclasses.replace(SMALL, moe_every=2, num_experts=4)
B, S = 4, 8


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, SMALL.vocab_size, (B, S + 1)), jnp.int32)


def test_every_parameter_carries_its_strategy_and_the_spec_it_implies():
    mesh = make_mesh(pipeline=2, expert=2, tensor=2)
    model = nnx.eval_shape(lambda: Transformer(dataclasses.replace(MOE, num_layers=4), mesh=mesh, rngs=nnx.Rngs(0)))
    expected = {  # role -> spec of the kernel (stacked layers: [virtual_stages, groups/v, ...])
        "embedding": (("pipeline", "tensor"), None),
        "attention.query": (None, "pipeline", None, "tensor", None),
        "attention.out": (None, "pipeline", "tensor", None, None),
        "mlp.down": (None, "pipeline", "tensor", None),
        "moe.gate": (None, "pipeline", "expert", None, "tensor"),
        "moe.router": (None, "pipeline", None, None),
    }
    seen = {}
    for name, variable in flat_variables(model).items():
        meta = variable.get_metadata()
        assert meta["strategy"] in STRATEGIES, name
        assert meta["strategy"] == MEGATRON.strategy(meta["role"]), name
        seen[meta["role"]] = tuple(meta["out_sharding"])
    for role, spec in expected.items():
        assert seen[role] == spec, role


def loss_and_grads(config, mesh, tokens, weights, rules=None):
    return model_loss_and_grads(config, mesh, tokens, weights, rules)


@pytest.fixture(scope="module")
def reference(tokens):
    weights = export_state(Transformer(SMALL, mesh=tp_mesh(1), rngs=nnx.Rngs(0)))
    _, loss, grads, _ = loss_and_grads(SMALL, tp_mesh(1), tokens, weights)
    return weights, loss, grads


def assert_equal_to_reference(reference, loss, grads):
    _, loss_1, grads_1 = reference
    assert abs(loss - loss_1) <= 1e-5 * abs(loss_1)
    for name in grads_1:
        assert max_relative_error(grads[name], grads_1[name]) <= 1e-5, name


def test_override_replicates_kv_heads_and_keeps_the_math(tokens, reference):
    """At TP 2 with 2 kv heads the default splits k/v; the override replicates
    them, which adds one all-reduce of each k/v kernel gradient per layer."""
    config = dataclasses.replace(SMALL, partition_rules=(("attention.key", "replicated"), ("attention.value", "replicated")))
    model, loss, grads, collectives = loss_and_grads(config, tp_mesh(2), tokens, reference[0])
    key = flat_variables(model)["layers.blocks.0.attention.key.kernel"].get_metadata()
    assert key["strategy"] == "replicated" and "tensor" not in jax.tree.leaves(key["out_sharding"])
    assert_equal_to_reference(reference, loss, grads)
    _, _, _, default = loss_and_grads(SMALL, tp_mesh(2), tokens, reference[0])
    kv_kernel = SMALL.hidden_size * SMALL.num_kv_heads * SMALL.resolved_head_dim
    extra = sorted(collectives["all-reduce"])
    for size in default["all-reduce"]:
        extra.remove(size)
    assert extra == [kv_kernel] * 2  # k and v, in the layer scan's body (once per layer)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mlp.up": "diagonal"}, "unknown strategy 'diagonal'; choose one of column, row, vocab"),
        ({"mlp.up": "row"}, "'mlp.up' cannot be 'row'; its layer supports column"),
    ],
)
def test_bad_override_is_one_sentence(overrides, message):
    with pytest.raises(ValueError, match=message):
        PartitionRules(overrides)


def test_config_names_the_key_of_a_bad_override():
    with pytest.raises(ConfigError, match=r"^'model\.partition_rules': partition rule 'mlp\.up'"):
        parse_config({"model": {"partition_rules": {"mlp.up": "row"}}})
    config = parse_config({}, ["model.partition_rules={attention.key: replicated, attention.value: replicated}"])
    assert dict(config.model.partition_rules) == {"attention.key": "replicated", "attention.value": "replicated"}


def test_a_decoder_config_refuses_a_pattern_that_matches_no_role():
    with pytest.raises(ConfigError, match=r"partition rule 'mlp\.upp' matches no role"):
        parse_config({"model": {"partition_rules": {"mlp.upp": "column"}}})


def test_user_roles_take_their_layers_strategy_and_overrides_are_checked_against_it():
    """A user's role no rule matches takes the strategy its layer is written for;
    an override may name it (kv heads replicated), and one its layer cannot
    take is one sentence naming the role, the strategy and what it supports."""
    from lite_tp_jax import ColumnParallelLinear, ParallelAttention
    from lite_tp_jax.sharding.table import RuleError

    mesh = tp_mesh(2)
    patch = ColumnParallelLinear(8, 6, role="vit.patch", mesh=mesh, rngs=nnx.Rngs(0))
    assert patch.kernel.get_metadata()["strategy"] == "column"
    rules = PartitionRules({"enc.*.key": "replicated", "enc.*.value": "replicated", "vit.*": "row"})
    attention = ParallelAttention(8, 2, role="enc.attention", mesh=mesh, rules=rules, rngs=nnx.Rngs(0))
    assert attention.key.kernel.get_metadata()["strategy"] == "replicated" and not attention.kv_sharded
    assert attention.query.kernel.get_metadata()["out_sharding"] == (None, "tensor", None)
    with pytest.raises(RuleError, match=r"^partition rule 'vit\.\*': 'vit\.patch' cannot be 'row'; its layer supports column"):
        ColumnParallelLinear(8, 6, role="vit.patch", mesh=mesh, rules=rules, rngs=nnx.Rngs(0))
    with pytest.raises(RuleError, match=r"^no partition rule matches role 'mine'; add \{'mine': strategy\} to partition_rules"):
        MEGATRON.param("mine", nnx.initializers.zeros_init(), jax.random.key(0), (4,), (None,), mesh)
