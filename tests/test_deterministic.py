"""Deterministic mode: the fixed-order all-reduce and reduce-scatter against the
default psum (values, gradients, bytes on HLO), and the switch's jit keying.

The bitwise 1 x 8 vs 2 x 4 process comparison of a whole training run is in
tests/test_launch.py (it needs several processes).
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lite_tp_jax.core import collectives as C
from lite_tp_jax.core.hlo import collectives
from lite_tp_jax.core.mesh import make_mesh


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=2, tensor=4)


def region(mesh, fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


PER_RANK = P(("data", "tensor"))  # rank r of the 8 holds x[r]


@pytest.mark.parametrize("axis", ["tensor", ("data", "tensor")])
@pytest.mark.parametrize("shape", [(5, 3), ()])  # 15 and 1 elements: padded to a multiple of the ranks
def test_ordered_all_reduce_equals_psum(mesh, rng, axis, shape):
    x = rng.standard_normal((8, *shape)).astype(np.float32)
    reduce = region(mesh, lambda v: C.all_reduce(v[0], axis)[None], PER_RANK, PER_RANK)
    expected = reduce(x)
    with C.deterministic_collectives():
        actual = region(mesh, lambda v: C.all_reduce(v[0], axis)[None], PER_RANK, PER_RANK)(x)
    groups = x.reshape(2, 4, *shape).sum(1, keepdims=True) if axis == "tensor" else x.sum(0, keepdims=True)
    np.testing.assert_allclose(actual, np.broadcast_to(groups, (2, 4, *shape)).reshape(x.shape), rtol=1e-6)
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_ordered_reduce_scatter_equals_psum_scatter(mesh, rng):
    x = rng.standard_normal((8, 3, 8)).astype(np.float32)
    fn = lambda v: C.reduce_scatter(v[0], "tensor", dim=-1)[None]  # noqa: E731
    expected = region(mesh, fn, PER_RANK, PER_RANK)(x)
    with C.deterministic_collectives():
        actual = region(mesh, fn, PER_RANK, PER_RANK)(x)
    sums = x.reshape(2, 4, 3, 8).sum(1)  # [data, 3, 8]; tensor rank t keeps columns 2t, 2t+1
    want = np.stack([sums[d][:, 2 * t: 2 * t + 2] for d in range(2) for t in range(4)])
    np.testing.assert_allclose(actual, want, rtol=1e-6)
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_gradients_match_default_mode(mesh, rng):
    """Under jax.grad the fixed-order primitives transpose like psum / psum_scatter."""
    x = rng.standard_normal((8, 4, 8)).astype(np.float32)
    c = rng.standard_normal((8, 4, 2)).astype(np.float32)

    def loss(x):
        def body(v, c):
            y = C.reduce_scatter(jnp.sin(v[0]), "tensor", dim=-1)  # [4, 2] per rank
            total = C.all_reduce(jnp.sum(y * c[0]), ("data", "tensor"))
            return (total * jnp.cos(total))[None]
        return region(mesh, body, (PER_RANK, PER_RANK), P())(x, c).sum()

    expected = jax.grad(loss)(x)
    with C.deterministic_collectives():
        actual = jax.grad(loss)(x)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def _hlo(mesh, fn, x):
    return region(mesh, fn, PER_RANK, PER_RANK).lower(x).compile().as_text()


def test_ordered_all_reduce_moves_ring_bytes(mesh):
    """No all-reduce; one all-to-all and one all-gather, each the array's size,
    of which (n-1)/n leaves the device: 2(n-1)/n in all, as a ring all-reduce."""
    x = jax.ShapeDtypeStruct((8, 64, 16), jnp.float32)
    fn = lambda v: C.all_reduce(v[0], "tensor")[None]  # noqa: E731
    default = collectives(_hlo(mesh, fn, x))
    assert [(c.kind, c.bytes) for c in default] == [("all-reduce", 64 * 16 * 4)]
    with C.deterministic_collectives():
        ordered = collectives(_hlo(mesh, fn, x))
    assert sorted((c.kind, c.bytes) for c in ordered) == [("all-gather", 64 * 16 * 4), ("all-to-all", 64 * 16 * 4)]


def test_ordered_reduce_scatter_is_one_all_to_all(mesh):
    x = jax.ShapeDtypeStruct((8, 64, 16), jnp.float32)
    fn = lambda v: C.reduce_scatter(v[0], "tensor", dim=0)[None]  # noqa: E731
    with C.deterministic_collectives():
        ordered = collectives(_hlo(mesh, fn, x))
    assert [(c.kind, c.bytes) for c in ordered] == [("all-to-all", 64 * 16 * 4)]


def test_switch_is_part_of_the_jit_key(mesh):
    """One jitted function traced in both modes: each mode gets its own program."""
    step = region(mesh, lambda v: C.all_reduce(v[0], "tensor")[None], PER_RANK, PER_RANK)
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    kinds = lambda: sorted({c.kind for c in collectives(step.lower(x).compile().as_text())})  # noqa: E731
    assert kinds() == ["all-reduce"]
    with C.deterministic_collectives():
        assert kinds() == ["all-gather", "all-to-all"]
    assert kinds() == ["all-reduce"]
    assert not C.deterministic()


def test_every_sum_of_the_training_step_is_switched():
    """The compiled deterministic TrainStep (data 2 x tensor 4, sequence
    parallel: gradient sums over "data", tensor all-reduces and reduce-scatters,
    loss and norm sums) adds nothing with all-reduce or reduce-scatter: its only
    all-reduce is the cross-entropy's max, which is exact in any order."""
    import re

    from lite_tp_jax.core.mesh import make_mesh_for
    from lite_tp_jax.run.config_file import load_config
    from lite_tp_jax.run.optimizer import create_model_and_optimizer
    from lite_tp_jax.sharding.rules import batch_sharding
    from lite_tp_jax.train.decoder_step import decoder_step

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    config = load_config(tiny, ["mesh.data=2", "mesh.tensor=4", "model.sequence_parallel=true",
                                               "train.deterministic=true"])
    mesh = make_mesh_for(config.mesh.requested, spares=config.mesh.spares)
    step = decoder_step(*create_model_and_optimizer(config.model, config.train, mesh), config.train)
    tokens = jax.device_put(np.zeros((8, 64), np.int32), batch_sharding(mesh))
    hlo = step.lower((tokens, tokens)).compile().as_text()
    kinds = {c.kind for c in collectives(hlo)}
    assert kinds == {"all-to-all", "all-gather", "all-reduce"}, kinds
    reductions = [line for line in hlo.splitlines() if re.search(r" (all-reduce|reduce-scatter)(-start)?\(", line)]
    assert reductions and all(re.search(r'op_name="[^"]*/pmax"', line) for line in reductions), reductions
