"""The global gradient norm: every element counted once, whatever the mesh, with one all-reduce."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from lite_tp_jax import export_state, make_mesh
from lite_tp_jax.core.hlo import summary
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.parallel.grads import clip_by_norm, global_norm

SMALL = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=40)


@pytest.mark.parametrize(
    "sizes", [dict(data=2, tensor=3), dict(data=2, expert=2, tensor=2)],
    ids=["data2-tensor3", "data2-expert2-tensor2"],
)
def test_global_norm_counts_every_element_once(sizes):
    devices = jax.devices()[: int(np.prod(list(sizes.values())))]
    mesh = make_mesh(**sizes, devices=devices)
    config = dataclasses.replace(SMALL, moe_every=2, num_experts=4) if "expert" in sizes else SMALL
    params = nnx.state(Transformer(config, mesh=mesh, rngs=nnx.Rngs(0)), nnx.Param)
    expected = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in export_state(params).values()))
    norm = jax.jit(lambda p: global_norm(p, mesh))
    assert abs(float(norm(params)) - expected) <= 1e-5 * expected
    assert summary(norm.lower(params).compile().as_text()) == {"all-reduce": [1]}


def test_clip_by_norm_scales_only_above_the_limit():
    grads = {"a": np.array([3.0, 4.0], np.float32)}
    np.testing.assert_allclose(clip_by_norm(grads, np.float32(5.0), 10.0)["a"], [3.0, 4.0])
    np.testing.assert_allclose(clip_by_norm(grads, np.float32(5.0), 1.0)["a"], [0.6, 0.8], rtol=1e-6)
