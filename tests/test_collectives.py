"""Each collective and each Megatron conjugate pair against numpy, forward and
under jax.grad (the backward collective is what makes the gradient right)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tp_mesh
from lite_tp_jax.core import collectives as C

T = 4


@pytest.fixture(scope="module")
def mesh():
    return tp_mesh(T)


def region(mesh, fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={"tensor"}))


def test_primitives_match_numpy(mesh, rng):
    x = rng.standard_normal((T, 8, 3)).astype(np.float32)  # rank r holds x[r]
    per_rank = P("tensor")

    reduced = region(mesh, lambda v: C.all_reduce(v[0])[None], per_rank, per_rank)(x)
    np.testing.assert_allclose(reduced, np.broadcast_to(x.sum(0), x.shape), rtol=1e-6)

    gathered = region(mesh, lambda v: C.all_gather(v[0], dim=0)[None], per_rank, per_rank)(x)
    np.testing.assert_array_equal(gathered, np.broadcast_to(x.reshape(T * 8, 3), (T, T * 8, 3)))

    scattered = region(mesh, lambda v: C.reduce_scatter(v[0], dim=0)[None], per_rank, per_rank)(x)
    np.testing.assert_allclose(scattered, x.sum(0).reshape(T, 2, 3), rtol=1e-6)


def test_unknown_axis_name_is_an_error(mesh):
    with pytest.raises(NameError, match="tensr"):
        region(mesh, lambda v: C.all_reduce(v, "tensr"), P("tensor"), P("tensor"))(np.ones((T, 2), np.float32))


def test_copy_to_and_reduce_from(mesh, rng):
    """out = x * sum_r w_r: copy_to (bwd all-reduce) then reduce_from (fwd all-reduce)."""
    x = rng.standard_normal((5, 3)).astype(np.float32)
    w = rng.standard_normal((T * 3,)).astype(np.float32)
    c = rng.standard_normal((5, 3)).astype(np.float32)

    def body(x, w):
        return C.reduce_from_tensor_region(C.copy_to_tensor_region(x) * w)

    f = region(mesh, body, (P(), P("tensor")), P())
    w_sum = w.reshape(T, 3).sum(0)
    np.testing.assert_allclose(f(x, w), x * w_sum, rtol=1e-5)
    gx, gw = jax.grad(lambda x, w: jnp.sum(c * f(x, w)), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, c * w_sum, rtol=1e-5)
    np.testing.assert_allclose(gw, np.tile((c * x).sum(0), T), rtol=1e-5)


def test_scatter_to_and_gather_from(mesh, rng):
    """out = x * w: split x, scale by this rank's w, all-gather (bwd: split, then all-gather)."""
    x = rng.standard_normal((5, T * 2)).astype(np.float32)
    w = rng.standard_normal((T * 2,)).astype(np.float32)
    c = rng.standard_normal((5, T * 2)).astype(np.float32)

    def body(x, w):
        return C.gather_from_tensor_region(C.scatter_to_tensor_region(x, "tensor", -1) * w, "tensor", -1)

    f = region(mesh, body, (P(), P("tensor")), P())
    np.testing.assert_allclose(f(x, w), x * w, rtol=1e-6)
    gx, gw = jax.grad(lambda x, w: jnp.sum(c * f(x, w)), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, c * w, rtol=1e-5)
    np.testing.assert_allclose(gw, (c * x).sum(0), rtol=1e-5)


def test_sequence_gather_and_reduce_scatter(mesh, rng):
    """Rank r: gather the sequence shards, scale by s_r, reduce-scatter back.
    out = x * sum_r s_r; backward runs reduce-scatter then all-gather."""
    x = rng.standard_normal((2, T * 2, 3)).astype(np.float32)
    s = rng.standard_normal((T,)).astype(np.float32)
    c = rng.standard_normal(x.shape).astype(np.float32)

    def body(x, s):
        full = C.gather_from_sequence_region(x, "tensor", 1)
        return C.reduce_scatter_to_sequence_region(full * s, "tensor", 1)

    seq = P(None, "tensor", None)
    f = region(mesh, body, (seq, P("tensor")), seq)
    np.testing.assert_allclose(f(x, s), x * s.sum(), rtol=1e-5)
    gx, gs = jax.grad(lambda x, s: jnp.sum(c * f(x, s)), argnums=(0, 1))(x, s)
    np.testing.assert_allclose(gx, c * s.sum(), rtol=1e-5)
    np.testing.assert_allclose(gs, np.full(T, (c * x).sum()), rtol=1e-4)


def test_conjugates_lower_to_the_named_collectives(mesh):
    """copy_to/reduce_from: one all-reduce each way; the sequence pair: one
    all-gather and one reduce-scatter each way; nothing else."""
    from lite_tp_jax.core.hlo import summary

    x = jnp.ones((2, T * 2, 3))

    def tp(x, w):
        return C.reduce_from_tensor_region(C.copy_to_tensor_region(x) * w)

    f = jax.shard_map(tp, mesh=mesh, in_specs=(P(), P("tensor")), out_specs=P(), axis_names={"tensor"})
    hlo = jax.jit(jax.value_and_grad(lambda x, w: f(x, w).sum(), argnums=(0, 1))).lower(x, jnp.ones(T * 3)).compile().as_text()
    assert summary(hlo) == {"all-reduce": [2 * 8 * 3, 2 * 8 * 3]}

    def sp(x, s):
        return C.reduce_scatter_to_sequence_region(C.gather_from_sequence_region(x, "tensor", 1) * s, "tensor", 1)

    seq = P(None, "tensor", None)
    g = jax.shard_map(sp, mesh=mesh, in_specs=(seq, P("tensor")), out_specs=seq, axis_names={"tensor"})
    # A cotangent the compiler cannot constant-fold, so the backward collectives stay.
    loss = jax.value_and_grad(lambda x, s, c: jnp.sum(c * g(x, s)))
    hlo = jax.jit(loss).lower(x, jnp.ones(T), x).compile().as_text()
    counts = summary(hlo)
    assert counts["all-gather"] == [2 * 8 * 3, 2 * 8 * 3]
    assert counts["reduce-scatter"] == [2 * 2 * 3, 2 * 2 * 3]
    assert counts["all-reduce"] == [1]  # only the scalar loss, summed over the sequence shards
    assert set(counts) == {"all-gather", "reduce-scatter", "all-reduce"}


def test_hlo_reads_combined_collectives_of_many_arrays():
    """XLA writes /*index=5*/ comments into tuple types of six or more arrays."""
    from lite_tp_jax.core.hlo import collectives

    shapes = ", ".join(f"f32[{i + 1},2]{{1,0}}" for i in range(5))
    line = f"%ar = ({shapes}, /*index=5*/f32[7,2]{{1,0}}) all-reduce(%a, %b), channel_id=1, to_apply=%sum"
    assert [c.shape for c in collectives(line)] == [(1, 2), (2, 2), (3, 2), (4, 2), (5, 2), (7, 2)]
