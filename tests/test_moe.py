"""MoEMLP against an independent one-device reference, exact dispatch with a
forced router, its communication read from HLO, and bad input."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import max_relative_error
from lite_tp_jax import export_state, import_state, make_mesh
from lite_tp_jax.core.hlo import collectives
from lite_tp_jax.layers.moe import MoEMLP

B, S, H, F, E = 4, 8, 12, 20, 16  # F = 20: uneven over tensor 3 (7, 7, 6), stored padded to 21
AUX_WEIGHT, Z_WEIGHT = 0.1, 0.01


def mesh_of(expert, tensor):
    return make_mesh(expert=expert, tensor=tensor, devices=jax.devices()[: expert * tensor])


# --- the reference: plain numpy routing, jax.numpy math on one device ----------


def reference_routing(probs, top_k, slots):
    """Expert ids ``[B, S, k]`` and a kept mask, by loops: per row, first choices
    in sequence order, then second choices, ...; an expert takes ``slots`` at most."""
    probs = np.asarray(probs)
    experts = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
    kept = np.zeros(experts.shape, bool)
    for b in range(probs.shape[0]):
        used = [0] * probs.shape[-1]
        for c in range(top_k):
            for s in range(probs.shape[1]):
                e = experts[b, s, c]
                if used[e] < slots:
                    kept[b, s, c] = True
                used[e] += 1
    return experts, kept


def reference(weights, x, experts, kept, routing):
    """y, aux loss and z-loss for fixed routing decisions; every expert runs on
    every token and each token sums its kept choices (no dispatch, no sorting)."""
    top_k = experts.shape[-1]
    logits = x @ weights["router.kernel"]
    if routing.scoring == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
        scores = probs = jax.nn.softmax(logits, axis=-1)
    gates = jnp.take_along_axis(scores, experts, axis=-1)
    if (top_k > 1) if routing.norm_topk_prob is None else routing.norm_topk_prob:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    gate = jnp.einsum("bsh,ehf->bsef", x, weights["gate.kernel"])
    up = jnp.einsum("bsh,ehf->bsef", x, weights["up.kernel"])
    every_expert = jnp.einsum("bsef,efh->bseh", jax.nn.silu(gate) * up, weights["down.kernel"])
    chosen = jnp.take_along_axis(every_expert, experts[..., None], axis=2)  # [B, S, k, H]
    y = jnp.sum((gates * kept)[..., None] * chosen, axis=2)
    if routing.shared:
        shared = (jax.nn.silu(x @ weights["shared.gate.kernel"]) * (x @ weights["shared.up.kernel"])) @ weights["shared.down.kernel"]
        if routing.gate:
            shared = shared * jax.nn.sigmoid(x @ weights["shared_gate.kernel"])
        y = y + shared
    # per routing group (row): aux_b = E * sum_e f_be P_be; the loss is their mean
    fraction = np.stack([np.bincount(row.ravel(), minlength=E) / row.size for row in experts])  # [B, E]
    aux = jnp.mean(E * jnp.sum(fraction * jnp.mean(probs, axis=1), axis=-1))
    z_loss = jnp.mean(jax.scipy.special.logsumexp(logits, axis=-1) ** 2)
    return y, aux, z_loss


def capacity_of(seq, top_k, capacity_factor):
    return seq if capacity_factor is None else math.ceil(capacity_factor * seq * top_k / E)


@pytest.fixture(scope="module", autouse=True)
def no_compilation_cache():
    """These programs are compiled here, not loaded from the disk cache: with
    conftest's fast-compile XLA flags, some (the grouped dispatch's sorts and
    gathers under collectives, on fake CPU devices) came back from the cache
    computing wrong values or aborting, while compiling them afresh is exact."""
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, S, H)).astype(np.float32)
    cotangent = rng.standard_normal((B, S, H)).astype(np.float32)
    return x, cotangent


def poison_padding(layer):
    """NaN in every stored entry past the logical shape (uneven tensor shards)."""
    padded = 0
    for _, variable in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        logical = tuple(slice(0, n) for n in variable.get_metadata()["logical_shape"])
        value = np.asarray(variable[...]).copy()
        padded += value.size - value[logical].size
        poisoned = np.full_like(value, np.nan)
        poisoned[logical] = value[logical]
        variable[...] = jax.device_put(poisoned, variable[...].sharding)
    return padded


class Routing(NamedTuple):
    top_k: int
    capacity_factor: float | None
    scoring: str = "softmax"
    norm_topk_prob: bool | None = None
    shared: int = 0  # shared expert hidden size (10: uneven over tensor 3)
    gate: bool = False  # its sigmoid gate

    def layer(self, **kwargs):
        return MoEMLP(
            H, F, num_experts=E, top_k=self.top_k, capacity_factor=self.capacity_factor, scoring=self.scoring,
            norm_topk_prob=self.norm_topk_prob, shared_hidden_features=self.shared, shared_gate=self.gate,
            rngs=nnx.Rngs(0), **kwargs,
        )


# Top-k 1, 2 and 8 of 16 dropless with a shared expert (softmax and sigmoid scores, gated
# and not), and top-2 at capacity 1.0 (drops) without renormalised gates.
ROUTINGS = [
    Routing(1, None, shared=10),
    Routing(2, None, shared=10, gate=True),
    Routing(8, None, "sigmoid", True, shared=10, gate=True),
    Routing(2, 1.0, norm_topk_prob=False),
]
# name: (expert, tensor, sequence_parallel, dispatch)
MESHES = {
    "ep2-tp2": (2, 2, False, "grouped"),
    "ep4": (4, 1, False, "grouped"),
    "tp3-uneven": (1, 3, False, "grouped"),
    "ep2-tp2-sp": (2, 2, True, "grouped"),
    "ep2-tp2-one-hot": (2, 2, False, "one_hot"),
}


@pytest.fixture(scope="module")
def references(data):
    """Per routing: (weights, experts, kept, y, aux loss, z-loss, gradients) of the
    one-device reference, with the weights every mesh's layer is initialised to."""
    x, cotangent = data
    out = {}
    for routing in ROUTINGS:
        weights = {k: jnp.asarray(v) for k, v in export_state(routing.layer(mesh=mesh_of(1, 1))).items()}
        probs = jax.nn.softmax(x @ weights["router.kernel"], axis=-1)  # the same order as sigmoid scores
        experts, kept = reference_routing(probs, routing.top_k, capacity_of(S, routing.top_k, routing.capacity_factor))

        def reference_loss(weights, x, experts=experts, kept=kept, routing=routing):
            y, aux, z_loss = reference(weights, x, experts, kept, routing)
            return jnp.sum(cotangent * y) + AUX_WEIGHT * aux + Z_WEIGHT * z_loss, (y, aux, z_loss)

        (_, (y, aux, z_loss)), grads = jax.value_and_grad(reference_loss, argnums=(0, 1), has_aux=True)(weights, x)
        out[routing] = (weights, experts, kept, y, aux, z_loss, grads)
    return out


@pytest.mark.parametrize("mesh", MESHES)
def test_matches_reference(mesh, data, references):
    """Every routing of ``ROUTINGS`` on one mesh, in one compiled program: values,
    statistics and every gradient against the one-device reference."""
    expert, tensor, sequence_parallel, dispatch = MESHES[mesh]
    x, cotangent = data
    layers = [
        routing.layer(dispatch=dispatch, sequence_parallel=sequence_parallel, mesh=mesh_of(expert, tensor))
        for routing in ROUTINGS
    ]
    if tensor == 3:
        assert all(poison_padding(layer) > 0 for layer in layers)

    def layer_loss(layer, x):
        y, stats = layer(x)
        return jnp.sum(cotangent * y) + AUX_WEIGHT * stats["aux_loss"] + Z_WEIGHT * stats["z_loss"], (y, stats)

    step = nnx.value_and_grad(layer_loss, argnums=(0, 1), has_aux=True)
    results = nnx.jit(lambda layers, x: [step(layer, x) for layer in layers])(layers, x)

    for layer, routing, ((_, (y, stats)), grads) in zip(layers, ROUTINGS, results, strict=True):
        case = str(routing)
        weights, experts, kept, y_ref, aux_ref, z_ref, grads_ref = references[routing]
        for name, value in export_state(layer).items():  # the reference's weights: initialisation is mesh-independent
            np.testing.assert_array_equal(value, weights[name])
        assert max_relative_error(y, y_ref) <= 1e-5, f"forward {case}"
        assert abs(float(stats["aux_loss"]) - float(aux_ref)) <= 1e-5 * abs(float(aux_ref)), f"aux_loss {case}"
        assert abs(float(stats["z_loss"]) - float(z_ref)) <= 1e-5 * abs(float(z_ref)), f"z_loss {case}"
        load = np.bincount(experts.ravel(), minlength=E)  # assignments per expert, before dropping
        assert float(stats["load_max"]) == pytest.approx(load.max() / load.mean(), rel=1e-6), case
        assert float(stats["load_min"]) == pytest.approx(load.min() / load.mean(), rel=1e-6), case
        dropped = int((~kept).sum())
        assert (dropped > 0) == (routing.capacity_factor is not None), case  # the capacity case does drop
        assert float(stats["dropped"]) == dropped, case
        assert float(stats["dropped_fraction"]) == pytest.approx(dropped / kept.size, rel=1e-6), case
        assert all(v.dtype == jnp.float32 and v.shape == () for v in stats.values())
        weight_grads = export_state(grads[0])
        assert weight_grads.keys() == grads_ref[0].keys()
        for name, g in weight_grads.items():
            assert max_relative_error(g, grads_ref[0][name]) <= 1e-5, f"gradient of {name} {case}"
        assert max_relative_error(grads[1], grads_ref[1]) <= 1e-5, f"gradient of x {case}"


def test_parameters_and_shardings():
    layer = MoEMLP(H, F, num_experts=E, mesh=mesh_of(2, 3), rngs=nnx.Rngs(0))
    shapes = {name: v.shape for name, v in export_state(layer).items()}
    assert shapes == {
        "router.kernel": (H, E), "gate.kernel": (E, H, F), "up.kernel": (E, H, F), "down.kernel": (E, F, H),
    }
    specs = {
        name: tuple(getattr(layer, name).kernel.get_metadata()["out_sharding"])
        for name in ("router", "gate", "up", "down")
    }
    assert specs == {
        "router": (), "gate": ("expert", None, "tensor"), "up": ("expert", None, "tensor"),
        "down": ("expert", "tensor", None),
    }


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """``jax.lax.ragged_all_to_all`` as its docstring specifies it, built from a
    padded ``all_to_all`` (XLA:CPU cannot run the real one)."""
    n, position = operand.shape[0], jnp.arange(operand.shape[0])
    index = jnp.clip(input_offsets[:, None] + position, 0, n - 1)
    chunks = jnp.where((position < send_sizes[:, None])[..., None], operand[index], 0.0)  # [ep, n, H]: for rank j
    received = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # from rank j
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where rank j writes here
    target = jnp.where(position < recv_sizes[:, None], offsets[:, None] + position, output.shape[0])
    return output.at[target].set(received, mode="drop")


def test_ragged_exchange_equals_padded(data, monkeypatch):
    """The ragged exchange's offsets and sizes, run through an emulation of
    ``ragged_all_to_all``'s documented semantics, give the padded exchange's
    values and gradients (expert 4: uneven groups per rank; capacity drops
    some rows). tests/test_architecture.py lowers the real one for cuda and tpu."""
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    x, cotangent = data
    routings = [Routing(3, 1.0)]
    layers = [routing.layer(exchange=exchange, mesh=mesh_of(4, 1)) for routing in routings
              for exchange in ("padded", "ragged")]

    def loss(layer, x):
        y, stats = layer(x)
        return jnp.sum(cotangent * y) + AUX_WEIGHT * stats["aux_loss"], y

    step = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    results = nnx.jit(lambda layers, x: [step(layer, x) for layer in layers])(layers, x)
    for padded, ragged in zip(results[::2], results[1::2]):
        (_, y_padded), (weights_padded, x_padded) = padded
        (_, y_ragged), (weights_ragged, x_ragged) = ragged
        assert max_relative_error(y_ragged, y_padded) <= 1e-6
        assert max_relative_error(x_ragged, x_padded) <= 1e-6
        for name, g in export_state(weights_padded).items():
            assert max_relative_error(export_state(weights_ragged)[name], g) <= 1e-6, name


# --- exact dispatch with a forced router and identity-like experts -------------
#
# Token features: [0, DE) carry the routing logits (router.kernel = identity on
# them), [DE, H-1) a payload, H-1 is the constant 1. Expert e: gate.kernel maps
# the constant to 100 on every hidden unit (silu(100) = 100 in float32),
# up.kernel is the identity (hidden = H), down.kernel = (e + 1) I. So expert e
# returns exactly 100 (e + 1) x, and y[..., H-1] / 100 - 1 names the expert.

DH, DE = 8, 4  # features (hidden = DH) and experts of the dispatch tests


def identity_experts(layer):
    gate = np.zeros((DE, DH, DH), np.float32)
    gate[:, DH - 1, :] = 100.0
    up = np.broadcast_to(np.eye(DH, dtype=np.float32), (DE, DH, DH))
    down = np.stack([(e + 1) * np.eye(DH, dtype=np.float32) for e in range(DE)])
    router = np.zeros((DH, DE), np.float32)
    router[:DE] = np.eye(DE)
    bias = {"expert_bias": np.zeros(DE, np.float32)} if layer.expert_bias is not None else {}
    import_state(layer, {"router.kernel": router, "gate.kernel": gate, "up.kernel": up, "down.kernel": down, **bias})


def tokens(logits, rng):
    """Inputs with the given router logits ``[B, S, DE]``."""
    payload = rng.standard_normal((*logits.shape[:2], DH - DE - 1)).astype(np.float32)
    return np.concatenate([logits, payload, np.ones((*logits.shape[:2], 1), np.float32)], axis=-1)


def dispatch_layer(top_k, capacity_factor, mesh=(2, 2), **kwargs):
    layer = MoEMLP(
        DH, DH, num_experts=DE, top_k=top_k, capacity_factor=capacity_factor,
        mesh=mesh_of(*mesh), rngs=nnx.Rngs(0), **kwargs,
    )
    identity_experts(layer)
    return layer


@pytest.mark.parametrize("mesh", [(2, 2), (4, 1)])
def test_dispatch_and_combine_are_exact(mesh):
    """Dropless top-1 with gate 1: every token reaches its expert and comes back in place."""
    rng = np.random.default_rng(2)
    target = rng.integers(0, DE, (B, S))
    x = tokens(np.where(np.eye(DE, dtype=bool)[target], 1000.0, -1000.0).astype(np.float32), rng)
    y, stats = jax.jit(dispatch_layer(1, None, mesh))(x)
    np.testing.assert_array_equal(np.asarray(y)[..., DH - 1], 100.0 * (target + 1))
    np.testing.assert_allclose(y, 100.0 * (target + 1)[..., None] * x, rtol=1e-6)
    assert float(stats["dropped"]) == 0.0


def test_expert_bias_steers_the_choice_not_the_gate():
    """Aux-free balancing: logits 1 on a token's target expert, 0 elsewhere
    (probabilities 0.475 and 0.175); a bias of 0.5 on expert 3 makes it every
    token's choice, with the unbiased 0.175 as its gate; the bias gets no
    gradient through the layer (the trainer moves it)."""
    rng = np.random.default_rng(5)
    target = rng.integers(0, DE - 1, (B, S))  # never expert 3
    x = tokens(np.eye(DE, dtype=np.float32)[target], rng)
    layer = dispatch_layer(1, None, expert_bias=True)
    layer.expert_bias[...] = jnp.asarray([0.0, 0.0, 0.0, 0.5])
    y, stats = jax.jit(layer)(x)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x)[0])))(layer)
    gate = np.exp(0.0) / (np.exp(1.0) + 3 * np.exp(0.0))
    np.testing.assert_allclose(np.asarray(y)[..., DH - 1], 100.0 * 4 * gate, rtol=1e-5)
    assert float(stats["load_max"]) == DE  # all assignments on expert 3: DE x the mean
    assert not np.asarray(grads.expert_bias[...]).any()


def test_overflow_is_dropped_and_counted():
    """All 8 tokens of a row to one expert, capacity 2: the first 2 in sequence
    order are kept, 6 per row are dropped and give y = 0."""
    rng = np.random.default_rng(3)
    target = np.array([0, 1, 2, 3])[:, None].repeat(S, axis=1)  # row b -> expert b
    x = tokens(np.where(np.eye(DE, dtype=bool)[target], 1000.0, -1000.0).astype(np.float32), rng)
    layer = dispatch_layer(1, 1.0)
    assert layer.capacity(S) == 2
    y, stats = jax.jit(layer)(x)
    expected = 100.0 * (target + 1)[..., None] * x
    expected[:, 2:] = 0.0
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=0)
    assert float(stats["dropped"]) == 6 * B
    assert float(stats["dropped_fraction"]) == 6 * B / (B * S)
    # Every token prefers its row's expert: per row, f and P are one-hot on it: aux = DE * 1.
    assert float(stats["aux_loss"]) == pytest.approx(float(DE), rel=1e-6)


def test_top2_slots_first_choices_before_second_choices():
    """GShard order: first choices of the whole row take slots before any second
    choice. Tokens 0-3 prefer expert 0 then 1, tokens 4-7 expert 1 then 0;
    capacity 4 is filled by first choices, so every second choice is dropped.
    (Token-major slotting would keep second choices of tokens 0 and 1.)"""
    rng = np.random.default_rng(4)
    first = np.array([0] * 4 + [1] * 4)
    second = 1 - first
    logits = np.full((B, S, DE), -1000.0, np.float32)
    logits[:, np.arange(S), first] = 10.0 + np.log(3.0)
    logits[:, np.arange(S), second] = 10.0  # gates 0.75 and 0.25
    x = tokens(logits, rng)
    layer = dispatch_layer(2, 1.0)
    assert layer.capacity(S) == 4
    y, stats = jax.jit(layer)(x)
    np.testing.assert_allclose(y, 0.75 * 100.0 * (first + 1)[None, :, None] * x, rtol=1e-5)
    assert float(stats["dropped"]) == S * B  # one (second) choice per token

    dropless = dispatch_layer(2, None)
    y, stats = jax.jit(dropless)(x)
    scale = 100.0 * (0.75 * (first + 1) + 0.25 * (second + 1))
    np.testing.assert_allclose(y, scale[None, :, None] * x, rtol=1e-5)
    assert float(stats["dropped"]) == 0.0


# --- communication ---------------------------------------------------------------


def compiled(layer, x, *, backward):
    """(all-to-all sizes, every other collective) of the jitted loss (and its gradient)."""
    graphdef, state = nnx.split(layer)
    cotangent = jnp.ones(x.shape)

    def loss(state, x):
        y, stats = nnx.merge(graphdef, state)(x)
        return jnp.sum(cotangent * y) + AUX_WEIGHT * stats["aux_loss"]

    fn = jax.value_and_grad(loss, argnums=(0, 1)) if backward else loss
    text = jax.jit(fn).lower(state, x).compile().as_text()
    found = collectives(text)
    return [c.elements for c in found if c.kind == "all-to-all"], [c for c in found if c.kind != "all-to-all"]


@pytest.mark.parametrize("dispatch,top_k,capacity_factor", [("grouped", 2, 1.25), ("one_hot", 1, None)])
def test_hlo_two_all_to_alls_forward_four_with_backward(dispatch, top_k, capacity_factor, data):
    """Grouped (CPU: the padded exchange): the rows for each expert rank, padded
    to all ``n = B_l * S * k`` of this rank's (token, choice) rows, go out and come
    back, plus one all-to-all of the ``E`` group sizes. One-hot: the ``[B_l, E, C, H]``
    expert buffers."""
    ep, tp = 2, 2
    x, _ = data
    layer = MoEMLP(H, 16, num_experts=E, top_k=top_k, capacity_factor=capacity_factor, dispatch=dispatch,
                   mesh=mesh_of(ep, tp), rngs=nnx.Rngs(0))
    b_local = B // ep
    if dispatch == "grouped":
        buffers = ep * b_local * S * top_k * H  # [ep, n, H]: 2 * 32 * 12 = 768
        sizes = [E]  # [ep, E / ep] group sizes, once (integers: no backward)
    else:
        buffers = b_local * E * capacity_of(S, top_k, capacity_factor) * H  # dropless: C = S: 2*16*8*12 = 3072
        sizes = []
    activations = (b_local, S, H)
    small = 2 * E + 1  # the statistics vector (and scalars)

    all_to_alls, others = compiled(layer, x, backward=False)
    assert sorted(all_to_alls) == sorted([buffers, buffers, *sizes])
    assert {c.kind for c in others} == {"all-reduce"}
    # y over "tensor"; the statistics over "expert" and "tensor"; the loss scalar over "expert".
    assert [c.shape for c in others].count(activations) == 1
    assert all(c.elements <= small for c in others if c.shape != activations)

    all_to_alls, others = compiled(layer, x, backward=True)
    assert sorted(all_to_alls) == sorted([buffers] * 4 + sizes)
    assert {c.kind for c in others} == {"all-reduce"}
    # y forward, dx backward; the rest: statistics and the router gradient [H, E].
    assert [c.shape for c in others].count(activations) == 2
    assert all(c.elements <= H * E for c in others if c.shape != activations)


# --- bad input -------------------------------------------------------------------


def test_num_experts_must_divide_over_expert_axis():
    with pytest.raises(ValueError, match=r"num_experts \(6\).*expert \(4\), the expert axis size"):
        MoEMLP(H, F, num_experts=6, mesh=mesh_of(4, 1), rngs=nnx.Rngs(0))


def test_top_k_must_be_at_most_num_experts():
    with pytest.raises(ValueError, match=r"top_k must be between 1 and num_experts \(16\), got 17"):
        MoEMLP(H, F, num_experts=E, top_k=17, mesh=mesh_of(1, 1), rngs=nnx.Rngs(0))


def test_bad_inputs(data):
    x, _ = data
    layer = MoEMLP(H, F, num_experts=E, mesh=mesh_of(2, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=f"last dimension is {H}"):
        layer(x[..., :-1])
    with pytest.raises(ValueError, match="batch size 3 is not divisible by the expert size 2"):
        layer(x[:3])
    with pytest.raises(ValueError, match=r"\[batch, seq, features\]"):
        layer(x[0])
    sequence_parallel = MoEMLP(H, F, num_experts=E, mesh=mesh_of(2, 2), sequence_parallel=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"sequence length seq_len \(\d+\) must be divisible by tensor \(2\)"):
        sequence_parallel(x[:, :7])
