"""Ring attention (context parallelism's attention core) against plain one-device
attention over the whole sequence: values and gradients, contiguous and zigzag
layouts, GQA, causal or not, sliding window, packed segments, heads over
"tensor"; its collective-permutes read from the compiled HLO."""

from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from conftest import max_relative_error
from lite_tp_jax.core.hlo import collectives, collectives_per_step
from lite_tp_jax.layers.masks import attention_mask
from lite_tp_jax.layers.ring_attention import ring_attention

B, S, N, D = 2, 16, 4, 8  # batch, sequence, query heads, head_dim
CONTEXT = "context"


def context_mesh(n: int, tensor: int) -> Mesh:
    """("context", "tensor") over the first n * tensor devices, tensor innermost."""
    return Mesh(np.array(jax.devices()[: n * tensor]).reshape(n, tensor), (CONTEXT, "tensor"))


def layout(n: int, zigzag: bool) -> np.ndarray:
    """The global index of each token in the order the ranks hold them: contiguous
    blocks, or zigzag (rank r holds chunks r and 2n-1-r of 2n)."""
    if not zigzag:
        return np.arange(S)
    c = S // (2 * n)
    return np.concatenate([np.r_[r * c:(r + 1) * c, (2 * n - 1 - r) * c:(2 * n - r) * c] for r in range(n)])


@partial(jax.jit, static_argnames=("causal", "window"))
def reference(q, k, v, segments, *, causal, window):
    """Plain float32 softmax attention over the whole, unpermuted sequence (one device)."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    positions = jnp.arange(q.shape[1])
    visible = attention_mask(positions, positions, causal=causal, window=window, q_segments=segments, k_segments=segments)
    scores = jnp.where(visible if visible.ndim == 2 else visible[:, None], scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def reference_and_grads(q, k, v, d_out, segments, **mask):
    out, pullback = jax.vjp(lambda q, k, v: reference(q, k, v, segments, **mask), q, k, v)
    return out, pullback(d_out)


@cache  # one compiled program per case, shared by its layouts and its HLO test
def ring_program(n, tensor, *, kv_split, batched_positions, with_segments, **mask):
    """jit of (q, k, v, d_out, positions, segments) -> (out, (dq, dk, dv)): ring
    attention inside a shard_map, sequence over "context", heads over "tensor"
    (kv heads too when ``kv_split``, else replicated)."""
    heads = P(None, CONTEXT, "tensor")
    kv = heads if kv_split else P(None, CONTEXT)
    where = P(None, CONTEXT) if batched_positions else P(CONTEXT)
    segments = P(None, CONTEXT) if with_segments else None

    def body(q, k, v, positions, segments):
        return ring_attention(
            q, k, v, axis_name=CONTEXT, q_positions=positions, k_positions=positions,
            q_segments=segments, k_segments=segments, **mask,
        )

    mesh = context_mesh(n, tensor)
    attend = jax.shard_map(body, mesh=mesh, in_specs=(heads, kv, kv, where, segments), out_specs=heads)

    def run(q, k, v, d_out, positions, segments):
        out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, positions, segments), q, k, v)
        return out, pullback(d_out)

    return jax.jit(run)


def inputs(kv_heads, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, S, N, D)).astype(dtype)
    k, v = (rng.standard_normal((B, S, kv_heads, D)).astype(dtype) for _ in range(2))
    d_out = rng.standard_normal((B, S, N, D)).astype(dtype)
    segments = np.array([[0] * 5 + [1] * 8 + [2] * 3, [0] * 11 + [1] * 5], np.int32)  # packed documents
    return q, k, v, d_out, segments


@pytest.fixture(scope="module", autouse=True)
def no_compilation_cache():
    """Compiled here, not loaded from the disk cache. An earlier form of the
    kernel (four conditionals unrolled per block) came back from the cache,
    under conftest's fast-compile XLA flags, computing wrong values, while
    compiling it afresh was exact (as tests/test_moe.py found for its
    programs). The loop form now used came back exact in two trials, but a
    cache fault must not pass for a kernel fault."""
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


def permuted(order, *arrays):
    return tuple(None if a is None else a[:, order] for a in arrays)


#  n, tensor, kv heads (< n in some, replicated over "tensor" when < tensor), causal, window, segments,
#  [B, S] positions, block_size (each held block of S / n cut in 4 x 4 sub-blocks, else the default 2 x 2)
CASES = [
    (2, 1, 2, True, None, False, False, 2),
    (2, 2, 1, False, 3, False, True, 512),
    (4, 1, 2, False, None, True, False, 1),
    (4, 2, 2, True, 5, True, True, 512),
]


@pytest.mark.parametrize("n, tensor, kv_heads, causal, window, with_segments, batched, block_size", CASES)
def test_equals_one_device(n, tensor, kv_heads, causal, window, with_segments, batched, block_size):
    """Values, dq, dk and dv within 1e-5 of one device, contiguous and zigzag
    layouts (one compiled program for both: the positions are data)."""
    mask = dict(causal=causal, window=window, block_size=block_size)
    q, k, v, d_out, segments = inputs(kv_heads)
    segments = segments if with_segments else None
    expected, expected_grads = reference_and_grads(q, k, v, d_out, segments, causal=causal, window=window)
    program = ring_program(
        n, tensor, kv_split=kv_heads >= tensor, batched_positions=batched, with_segments=with_segments, **mask
    )
    for zigzag in (False, True):
        order = layout(n, zigzag)
        positions = np.broadcast_to(order, (B, S)) if batched else order
        out, grads = program(*permuted(order, q, k, v, d_out), positions.astype(np.int32), *permuted(order, segments))
        restore = np.argsort(order)
        assert max_relative_error(out[:, restore], expected) < 1e-5, zigzag
        for name, grad, want in zip("qkv", grads, expected_grads):
            assert max_relative_error(grad[:, restore], want) < 1e-5, (name, zigzag)


def permutes(hlo: str, shape, dtype) -> list[int]:
    """How often one run of ``hlo`` runs each collective-permute of arrays ``shape`` / ``dtype``."""
    return [runs for c, runs in collectives_per_step(hlo) if c.kind == "collective-permute" and (c.shape, c.dtype) == (shape, dtype)]


def test_forward_permutes_k_and_v_n_minus_1_times():
    """n = 4: 3 collective-permutes each of K and V ([B, S/n, K/t, D] float32,
    256 bytes) and of the key positions and segments; nothing else."""
    n, tensor, kv_heads = 4, 2, 2
    mesh = context_mesh(n, tensor)
    heads, where = P(None, CONTEXT, "tensor"), P(None, CONTEXT)

    def body(q, k, v, positions, segments):
        return ring_attention(
            q, k, v, axis_name=CONTEXT, q_positions=positions, k_positions=positions,
            q_segments=segments, k_segments=segments, window=5,
        )

    attend = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(heads, heads, heads, where, where), out_specs=heads))
    q, k, v, _, segments = inputs(kv_heads)
    positions = np.broadcast_to(layout(n, True), (B, S)).astype(np.int32)
    hlo = attend.lower(q, k, v, positions, segments).compile().as_text()
    block = (B, S // n, kv_heads // tensor, D)
    assert permutes(hlo, block, "f32") == [n - 1, n - 1]  # K and V, in the loop of n - 1 steps
    block_bytes = B * (S // n) * (kv_heads // tensor) * D * 4  # 256
    assert sum(c.bytes * runs for c, runs in collectives_per_step(hlo) if c.shape == block) == 2 * (n - 1) * block_bytes
    assert permutes(hlo, (B, S // n), "s32") == [n - 1, n - 1]  # their positions and segment ids
    assert {c.kind for c in collectives(hlo)} == {"collective-permute"}
    assert len(collectives_per_step(hlo)) == 4


def test_backward_permutes_twice_the_forward():
    """The value-and-gradient program of the n = 4 case above: the forward's
    2(n - 1) permutes of K and V (test above), then the backward ring's n - 1
    each of K and V and n - 1 each of dK and dV (float32, back to their owners):
    6(n - 1) arrays of the K/V block's shape in all, and nothing else but the
    key positions and segment ids (n - 1 of each, each way)."""
    n, tensor, kv_heads, causal, window, with_segments, batched, block_size = CASES[-1]
    program = ring_program(
        n, tensor, kv_split=True, batched_positions=batched, with_segments=with_segments, causal=causal, window=window,
        block_size=block_size,
    )
    q, k, v, d_out, segments = inputs(kv_heads)
    positions = np.broadcast_to(layout(n, True), (B, S)).astype(np.int32)
    hlo = program.lower(q, k, v, d_out, positions, segments).compile().as_text()
    block = (B, S // n, kv_heads // tensor, D)
    assert sum(permutes(hlo, block, "f32")) == 6 * (n - 1)
    assert sum(permutes(hlo, (B, S // n), "s32")) == 2 * 2 * (n - 1)
    assert {c.kind for c, _ in collectives_per_step(hlo)} == {"collective-permute"}
    assert sum(runs for _, runs in collectives_per_step(hlo)) == 10 * (n - 1)


def test_in_a_layer_scan_nothing_per_block_is_kept():
    """Inside a scan over layers (as ``models/stack.py`` runs blocks), the masks of
    every (step, sub-block) depend only on the positions, the same at every
    layer: JAX's partial evaluation of the layer scan hoisted them out of it,
    materialising ``(n-1) x sub-blocks`` masked score arrays, memory quadratic in
    the sequence (found by benchmarks/context_parallel.py). The value-and-gradient
    program's temporaries stay far below one such array set."""
    n, seq, block = 8, 1024, 16
    mesh = context_mesh(n, 1)
    positions = np.arange(seq, dtype=np.int32)

    def layers(q, k, v, positions):
        def one(x, _):
            return ring_attention(x, x * k, x * v, axis_name=CONTEXT, q_positions=positions,
                                  k_positions=positions, block_size=block), None
        return jax.lax.psum(jnp.sum(jax.lax.scan(one, q, None, length=2)[0]), CONTEXT)

    spec = P(None, CONTEXT)
    loss = jax.shard_map(layers, mesh=mesh, in_specs=(spec, spec, spec, P(CONTEXT)), out_specs=P())
    x = jax.ShapeDtypeStruct((1, seq, N, D), jnp.float32)
    compiled = jax.jit(jax.grad(lambda q, k, v: loss(q, k, v, positions), argnums=(0, 1, 2))).lower(x, x, x).compile()
    hoisted = (n - 1) * (seq // n) ** 2 * N * 4  # the f32 scores of every (step, sub-block): 1.8 MB
    assert compiled.memory_analysis().temp_size_in_bytes < hoisted / 2


def test_bfloat16_close_and_bitwise_repeatable():
    """bfloat16 q, k, v: values and gradients within 2e-2 of the float32 one-device
    ones, in bfloat16; two runs give the same bits."""
    n, kv_heads = 2, 2
    mask = dict(causal=True, window=None)
    q, k, v, d_out, _ = inputs(kv_heads)
    expected, expected_grads = reference_and_grads(q, k, v, d_out, None, **mask)
    program = ring_program(n, 1, kv_split=True, batched_positions=False, with_segments=False, **mask)
    order = layout(n, True)
    args = (*permuted(order, *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, d_out))), order.astype(np.int32), None)
    out, grads = program(*args)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    restore = np.argsort(order)
    assert max_relative_error(out[:, restore], expected) < 2e-2
    for name, grad, want in zip("qkv", grads, expected_grads):
        assert max_relative_error(grad[:, restore], want) < 2e-2, name
    again = program(*args)
    for a, b in zip(jax.tree.leaves((out, grads)), jax.tree.leaves(again)):
        assert np.array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


def test_one_rank_is_plain_attention():
    """n = 1: no collective; equal to one device. A query whose keys are all in
    its future (keys shifted one position on) gets 0 and finite gradients."""
    kv_heads = 2
    q, k, v, d_out, _ = inputs(kv_heads, seed=1)
    program = ring_program(1, 1, kv_split=True, batched_positions=False, with_segments=False,
                           causal=True, window=None)
    positions = np.arange(S, dtype=np.int32)
    hlo = program.lower(q, k, v, d_out, positions, None).compile().as_text()
    assert collectives(hlo) == []
    out, grads = program(q, k, v, d_out, positions, None)
    expected, expected_grads = reference_and_grads(q, k, v, d_out, None, causal=True, window=None)
    assert max_relative_error(out, expected) < 1e-5
    for name, grad, want in zip("qkv", grads, expected_grads):
        assert max_relative_error(grad, want) < 1e-5, name

    @jax.jit
    def shifted(q, k, v, d_out):
        attend = jax.shard_map(
            lambda q, k, v: ring_attention(q, k, v, axis_name=CONTEXT, q_positions=positions, k_positions=positions + 1),
            mesh=context_mesh(1, 1), in_specs=P(None, CONTEXT), out_specs=P(None, CONTEXT),
        )
        out, pullback = jax.vjp(attend, q, k, v)
        return out, pullback(d_out)

    out, grads = shifted(q, k, v, d_out)
    assert np.all(np.asarray(out[:, 0]) == 0) and np.all(np.isfinite(out))
    assert all(np.all(np.isfinite(g)) for g in grads)
    # The other rows: query i sees keys at positions 1..i, the first i keys.
    expected = reference(q, k, v, None, causal=True, window=None)
    assert max_relative_error(out[:, 1:], expected[:, 1:]) > 1e-3  # not the same mask ...
    visible = reference(q[:, 1:], k[:, :-1], v[:, :-1], None, causal=True, window=None)
    assert max_relative_error(out[:, 1:], visible) < 1e-5  # ... but keys 0..i-1 for query i


@pytest.mark.parametrize("change, culprit", [
    (dict(k=np.zeros((B, S, 3, D), np.float32), v=np.zeros((B, S, 3, D), np.float32)), "K dividing N"),
    (dict(k_positions=np.arange(S - 1)), "positions must be"),
    (dict(q_segments=np.zeros((B, S), np.int32)), "both q_segments and k_segments"),
    (dict(block_size=0), "block_size must be a positive int"),
])
def test_bad_arguments_named(change, culprit):
    """A shape that cannot work is named before anything is traced (no mesh needed)."""
    q, k, v, _, _ = inputs(2)
    arguments = dict(q=q, k=k, v=v, q_positions=np.arange(S), k_positions=np.arange(S)) | change
    with pytest.raises(ValueError, match=culprit):
        ring_attention(**arguments, axis_name=CONTEXT)
