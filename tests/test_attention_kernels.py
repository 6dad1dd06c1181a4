"""Attention kernels: every kernel that runs on CPU equals the reference core,
alone and inside ParallelAttention at even and uneven TP degrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import max_relative_error, tp_mesh
from lite_tp_jax.layers.attention import ParallelAttention, attention_core

CPU_KERNELS = ("auto", "xla")  # "cudnn" needs a GPU (benchmarks/gpu_mfu.py runs it there)


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 8, 6, 4)).astype(np.float32)  # 6 query heads
    k, v = (rng.standard_normal((2, 8, 3, 4)).astype(np.float32) for _ in range(2))  # 3 kv heads (GQA)
    return q, k, v


def core_and_grads(kernel, q, k, v):
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    out, vjp = jax.vjp(lambda q, k, v: attention_core(q, k, v, kernel), q, k, v)
    return out, vjp(cotangent)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_kernel_equals_reference(qkv, kernel):
    out_ref, grads_ref = core_and_grads("reference", *qkv)
    out, grads = core_and_grads(kernel, *qkv)
    assert max_relative_error(out, out_ref) <= 1e-5
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert max_relative_error(g, g_ref) <= 1e-5, name


def test_reference_is_causal_softmax_attention(qkv):
    """The reference against a direct numpy evaluation, query head n on kv head n // 2."""
    q, k, v = (np.asarray(a, np.float64) for a in qkv)
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((8, 8), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)
    assert max_relative_error(attention_core(*qkv, "reference"), expected) <= 1e-5


@pytest.mark.parametrize("tp, sequence_parallel", [(2, True), (3, False)])
def test_parallel_attention_kernel_equals_reference(tp, sequence_parallel):
    """Same weights, kernel xla vs reference: outputs and every gradient. At TP 3
    the 2 kv heads are replicated (fewer than ranks), at TP 2 sharded."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 24)), jnp.float32)

    def run(kernel):
        layer = ParallelAttention(
            24, 4, num_kv_heads=2, mesh=tp_mesh(tp), sequence_parallel=sequence_parallel,
            rope_theta=10000.0, kernel=kernel, rngs=nnx.Rngs(0),
        )
        loss = lambda layer, x: jnp.sum(layer(x) ** 2)  # noqa: E731
        value, grads = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(layer, x)
        return value, jax.tree.leaves(grads)

    value_ref, grads_ref = run("reference")
    value, grads = run("xla")
    assert abs(value - value_ref) <= 1e-5 * abs(value_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert max_relative_error(g, g_ref) <= 1e-5


def test_unknown_kernel_is_named():
    with pytest.raises(ValueError, match="kernel must be one of auto, xla, cudnn, reference, got 'flash'"):
        ParallelAttention(8, 2, mesh=tp_mesh(1), kernel="flash", rngs=nnx.Rngs(0))
