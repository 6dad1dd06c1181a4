"""Eight fake CPU devices for every test; must run before jax initialises."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are shared through a disk cache between test processes
# (xdist workers, the CLI subprocesses) and later runs: most tests build the
# same small models on the same meshes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The suite compiles hundreds of small programs: LLVM's cheap pipeline halves the
# compile time, and XLA:CPU's older (non-MLIR) fusion emitters halve it again
# (the training step of tiny-moe at pipeline 2 x expert 2 x tensor 2: 3.4 -> 1.9 s).
# Results stay within every test's tolerance, and bitwise checks compare
# programs compiled alike (subprocesses inherit these flags).
_FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
)
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402

from lite_tp_jax.runtime.devices import allow_bf16_cpu_all_reduce  # noqa: E402

allow_bf16_cpu_all_reduce()  # bf16 compute on CPU (runtime.devices.BF16_CPU_FLAG)
jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lite_tp_jax.core.mesh import make_mesh  # noqa: E402

TP_DEGREES = (1, 2, 3, 4, 8)


def tp_mesh(tensor: int):
    """A mesh of the first ``tensor`` devices, all on the "tensor" axis."""
    return make_mesh(tensor=tensor, devices=jax.devices()[:tensor])


def max_relative_error(actual, expected) -> float:
    """max |a - e| / max |e|: the error relative to the array's scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def assert_matches_reference(layer, reference, *inputs, tol: float = 1e-5):
    """Forward values and gradients of ``layer(*inputs)`` against ``reference``.

    ``reference(weights, *inputs)`` is an unsharded jax.numpy function of the
    layer's logical weights (``export_state``). Gradients are compared w.r.t.
    every weight and every floating-point input, for the loss sum(c * y) with a
    fixed random cotangent c.
    """
    import jax.numpy as jnp
    from flax import nnx

    from lite_tp_jax import export_state

    weights = export_state(layer)
    float_args = tuple(i for i, x in enumerate(inputs) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating))
    expected = reference(weights, *inputs)
    cotangent = np.random.default_rng(1).standard_normal(expected.shape).astype(np.float32)

    def layer_loss(layer, *inputs):
        y = layer(*inputs)
        return jnp.sum(y * cotangent), y

    def reference_loss(weights, *inputs):
        y = reference(weights, *inputs)
        return jnp.sum(y * cotangent), y

    argnums = (0, *(i + 1 for i in float_args))
    (_, y), grads = nnx.jit(nnx.value_and_grad(layer_loss, argnums=argnums, has_aux=True))(layer, *inputs)
    (_, y_ref), grads_ref = jax.value_and_grad(reference_loss, argnums=argnums, has_aux=True)(weights, *inputs)

    assert y.shape == y_ref.shape
    assert max_relative_error(y, y_ref) <= tol, "forward"
    weight_grads = export_state(grads[0])
    assert weight_grads.keys() == grads_ref[0].keys()
    for name, g in weight_grads.items():
        assert max_relative_error(g, grads_ref[0][name]) <= tol, f"gradient of {name}"
    for i, (g, g_ref) in enumerate(zip(grads[1:], grads_ref[1:])):
        assert max_relative_error(g, g_ref) <= tol, f"gradient of input {i}"


def model_loss_and_grads(config, mesh, tokens, weights=None, rules=None):
    """A ``Transformer`` of ``config`` on ``mesh`` (optionally with ``weights``
    imported and a rule table), its loss on next-token ``tokens [B, S + 1]``,
    the logical gradients, and the compiled step's collectives (``hlo.summary``)."""
    from flax import nnx

    from lite_tp_jax import export_state, import_state
    from lite_tp_jax.core.hlo import summary
    from lite_tp_jax.models.transformer import Transformer

    model = Transformer(config, mesh=mesh, rules=rules, rngs=nnx.Rngs(0))
    if weights is not None:
        import_state(model, weights)
    graphdef, state = nnx.split(model)

    def loss(state):
        return nnx.merge(graphdef, state).loss(tokens[:, :-1], tokens[:, 1:])[0]

    fn = jax.jit(jax.value_and_grad(loss))
    value, grads = fn(state)
    return model, float(value), export_state(grads), summary(fn.lower(state).compile().as_text())


def train_steps(model_config, train, mesh, steps: int):
    """``steps`` steps of a fresh ``TrainStep`` of ``model_config`` on ``mesh``, on
    seeded random batches: ``(losses, step, (inputs, targets) of the last step)``."""
    from lite_tp_jax.run.optimizer import create_model_and_optimizer
    from lite_tp_jax.sharding.rules import batch_sharding
    from lite_tp_jax.train.decoder_step import decoder_step

    step = decoder_step(*create_model_and_optimizer(model_config, train, mesh), train)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        batch = rng.integers(0, model_config.vocab_size, (train.global_batch, train.seq_len + 1)).astype(np.int32)
        inputs, targets = (jax.device_put(a, batch_sharding(mesh)) for a in (batch[:, :-1], batch[:, 1:]))
        losses.append(float(step((inputs, targets))["loss"]))
    return np.array(losses), step, (inputs, targets)
