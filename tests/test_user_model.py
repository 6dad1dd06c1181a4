"""A user's own models built from the layers, run as one region with ``@tp.region``
and trained by the generic ``TrainStep``: a bidirectional encoder (masked-token
loss) and a small vision transformer. Losses and gradients of 3 steps equal the
same model's on one device, at data 2 x tensor 4, tensor 3 (uneven: heads,
ffn, vocab and classes are padded, the padding NaN) and tensor 2 with sequence
parallelism; the encoder's step has exactly the decoder's per-block collectives."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lite_tp_jax as tp
from conftest import max_relative_error, tp_mesh
from lite_tp_jax.core.hlo import collectives_per_step
from lite_tp_jax.sharding.state import flat_variables

DIM, HEADS, FFN, DEPTH = 24, 6, 40, 2
VOCAB, SEQ = 37, 8
IMAGE, PATCH, CHANNELS, CLASSES = 8, 4, 3, 10
ROWS = 4
STEPS = 3
LR = 0.5


class Block(nnx.Module):
    """Pre-norm residual block with bidirectional attention."""

    def __init__(self, *, mesh, sequence_parallel, rngs):
        layer = dict(mesh=mesh, sequence_parallel=sequence_parallel, rngs=rngs)
        self.attention_norm = tp.LayerNorm(DIM, **layer)
        self.attention = tp.ParallelAttention(DIM, HEADS, causal=False, **layer)
        self.mlp_norm = tp.LayerNorm(DIM, **layer)
        self.mlp = tp.ParallelMLP(DIM, FFN, activation="gelu", **layer)

    def __call__(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def blocks(mesh, sequence_parallel, rngs):
    return tp.stack_blocks(lambda rngs: Block(mesh=mesh, sequence_parallel=sequence_parallel, rngs=rngs), DEPTH,
                           mesh=mesh, rngs=rngs)


class Encoder(nnx.Module):
    """Masked-token model: tokens -> embedding + positions -> blocks -> norm -> tied head."""

    def __init__(self, mesh, sequence_parallel=False, *, rngs):
        self.mesh = mesh
        layer = dict(mesh=mesh, sequence_parallel=sequence_parallel, rngs=rngs)
        self.embed = tp.VocabParallelEmbedding(VOCAB, DIM, **layer)
        self.positions = tp.LearnedPositions(SEQ, DIM, **layer)
        self.blocks = blocks(mesh, sequence_parallel, rngs)
        self.norm = tp.LayerNorm(DIM, **layer)

    @tp.region()
    def loss(self, batch):
        x = tp.scan_blocks(self.blocks, self.positions(self.embed(batch["tokens"])))
        logits = self.embed.attend(self.norm(x))  # this rank's vocabulary slice
        losses = tp.vocab_parallel_cross_entropy(logits, batch["targets"], VOCAB, vocab_axes=self.embed.vocab_axes)
        masked = tp.batch_sum(batch["mask"])
        return tp.batch_sum(losses * batch["mask"]) / masked, {"masked": masked}


class ViT(nnx.Module):
    """Patches -> row-parallel patch embedding + positions -> blocks -> norm -> head, mean over patches."""

    def __init__(self, mesh, sequence_parallel=False, *, rngs):
        self.mesh = mesh
        layer = dict(mesh=mesh, sequence_parallel=sequence_parallel, rngs=rngs)
        self.patches = tp.RowParallelLinear(PATCH * PATCH * CHANNELS, DIM, input_is_parallel=False, **layer)
        self.positions = tp.LearnedPositions((IMAGE // PATCH) ** 2, DIM, **layer)
        self.blocks = blocks(mesh, sequence_parallel, rngs)
        self.norm = tp.LayerNorm(DIM, **layer)
        self.head = tp.ColumnParallelLinear(DIM, CLASSES, gather_output=True, **layer)

    @tp.region()
    def loss(self, batch):
        images = batch["images"]
        b, n = images.shape[0], IMAGE // PATCH
        patches = images.reshape(b, n, PATCH, n, PATCH, CHANNELS).transpose(0, 1, 3, 2, 4, 5).reshape(b, n * n, -1)
        x = tp.scan_blocks(self.blocks, self.positions(self.patches(patches)))
        logits = self.head(self.norm(x)).mean(axis=1)  # [rows, classes], replicated over "tensor"
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        accuracy = tp.batch_mean((jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32))
        return tp.batch_mean(losses), {"accuracy": accuracy}


def encoder_batch(rng):
    tokens = rng.integers(0, VOCAB, (ROWS, SEQ)).astype(np.int32)
    mask = (rng.random((ROWS, SEQ)) < 0.3).astype(np.float32)
    mask[0, 0] = 1.0
    return {"tokens": np.where(mask > 0, VOCAB - 1, tokens).astype(np.int32), "targets": tokens, "mask": mask}


def vit_batch(rng):
    return {
        "images": rng.standard_normal((ROWS, IMAGE, IMAGE, CHANNELS)).astype(np.float32),
        "labels": rng.integers(0, CLASSES, (ROWS,)).astype(np.int32),
    }


MODELS = {"encoder": (Encoder, encoder_batch), "vit": (ViT, vit_batch)}


def record_grads(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx``, keeping the last gradients in its state (to compare them)."""

    def init(params):
        return {"grads": jax.tree.map(jnp.zeros_like, params), "inner": tx.init(params)}

    def update(grads, state, params=None):
        updates, inner = tx.update(grads, state["inner"], params)
        return updates, {"grads": grads, "inner": inner}

    return optax.GradientTransformation(init, update)


def poison_padding(model) -> int:
    """NaN in every padded entry of every parameter; returns how many there are."""
    padded = 0
    for variable in flat_variables(nnx.state(model, nnx.Param)).values():
        value = np.asarray(variable[...]).copy()
        logical = tuple(slice(0, n) for n in variable.get_metadata()["logical_shape"])
        lead = (slice(None),) * (value.ndim - len(logical))
        padded += value.size - value[lead + logical].size
        poisoned = np.full_like(value, np.nan)
        poisoned[lead + logical] = value[lead + logical]
        variable[...] = jax.device_put(poisoned, variable[...].sharding)
    return padded


def train(name, mesh, sequence_parallel=False):
    """Losses, logical gradients per step, the step and its last batch: 3 SGD steps of model ``name`` on ``mesh``."""
    make, batch_of = MODELS[name]
    model = make(mesh, sequence_parallel, rngs=nnx.Rngs(0))
    padded = poison_padding(model)
    optimizer = tp.create_optimizer(model, record_grads(optax.sgd(LR)))
    step = tp.TrainStep(model, optimizer, lambda model, batch: model.loss(batch))
    rng = np.random.default_rng(0)
    losses, grads = [], []
    for _ in range(STEPS):
        batch = batch_of(rng)
        metrics = step(batch)
        losses.append(float(metrics["loss"]))
        grads.append(tp.export_state(optimizer.opt_state["grads"]))
        assert np.isfinite(float(metrics["grad_norm"]))
    return np.array(losses), grads, (step, batch), padded


MESHES = {
    "data2-tensor4": (lambda: tp.make_mesh(data=2, tensor=4), False),
    "tensor3": (lambda: tp_mesh(3), False),
    "tensor2-sp": (lambda: tp_mesh(2), True),
}


def check_trains_like_one_device(name: str) -> dict:
    """Losses and every gradient of 3 steps at each of ``MESHES`` equal one device's
    within 1e-5; returns each mesh's (step, last batch)."""
    expected_losses, expected_grads, _, _ = train(name, tp_mesh(1))
    steps = {}
    for mesh_name, (make_mesh, sequence_parallel) in MESHES.items():
        losses, grads, steps[mesh_name], padded = train(name, make_mesh(), sequence_parallel)
        if mesh_name == "tensor3":  # heads stay whole (6), ffn (40), vocab (37) and classes (10) are padded
            assert padded > 0
        assert max_relative_error(losses, expected_losses) <= 1e-5, (mesh_name, losses, expected_losses)
        for step, (got, want) in enumerate(zip(grads, expected_grads)):
            assert got.keys() == want.keys()
            for key in want:
                assert max_relative_error(got[key], want[key]) <= 1e-5, (mesh_name, step, key)
                assert np.abs(want[key]).max() > 0, (step, key)  # every parameter learns
    return steps


def check_per_block_collectives(step, batch, sequence_parallel: bool) -> None:
    """Per block (the collectives in the layer scan): the decoder's collectives of
    [rows, seq, dim] activations (tests/test_model.py, test_remat.py): 2 all-reduces
    per direction, or with sequence parallelism all-gathers and reduce-scatters (the
    backward regathering, as Megatron does); nothing else, and no reshard anywhere
    in the step (all-to-all, collective-permute)."""
    found = collectives_per_step(step.lower(batch).compile().as_text())
    assert not {c.kind for c, _ in found} & {"all-to-all", "collective-permute"}
    ours = sorted((c.kind, c.shape) for c, runs in found for _ in range(runs // DEPTH) if runs >= DEPTH)
    if sequence_parallel:  # 2 gathers forward, 2 again in the backward, 2 for the scatters' backward;
        # 2 reduce-scatters each way; the LayerNorms' scale and bias gradients summed over sequence shards
        full, shard = (ROWS, SEQ, DIM), (ROWS, SEQ // 2, DIM)
        expected = [("all-gather", full)] * 6 + [("all-reduce", (DIM,))] * 4 + [("reduce-scatter", shard)] * 4
    else:  # 2 forward, 2 backward, over "tensor", of this data rank's rows
        expected = [("all-reduce", (ROWS // 2, SEQ, DIM))] * 4
    assert ours == expected


def check_plan(step, batch) -> None:
    """``tp.plan``: the bytes per device are those a device holds (its addressable
    shards, measured); the collectives are the compiled step's, with their axes."""
    plan = tp.plan(step, batch)  # the step compiled for this batch already: no new compile
    device = step.mesh.devices.flat[5]
    held = sum(
        shard.data.nbytes for variable in flat_variables(step.model).values()
        for shard in variable[...].addressable_shards if shard.device == device
    )
    assert plan.parameter_bytes_per_device == held
    by_kind = {(c.kind, c.shape, c.axes): c.runs for c in plan.collectives}
    assert by_kind[("all-reduce", (ROWS // 2, SEQ, DIM), ("tensor",))] >= 4 * DEPTH
    assert {axes for _, _, axes in by_kind} <= {("data",), ("tensor",), ("data", "tensor")}
    assert "blocks.attention.query.kernel" in str(plan)


def test_user_encoder_trains_like_one_device_and_communicates_like_the_decoder():
    """The encoder at data 2 x tensor 4, tensor 3 and tensor 2 with sequence
    parallelism (one test, so each program compiles once under xdist): equal to
    one device; its steps' per-block collectives are the decoder's; tp.plan."""
    steps = check_trains_like_one_device("encoder")
    check_per_block_collectives(*steps["data2-tensor4"], sequence_parallel=False)
    check_per_block_collectives(*steps["tensor2-sp"], sequence_parallel=True)
    check_plan(*steps["data2-tensor4"])


def test_user_vit_trains_like_one_device():
    check_trains_like_one_device("vit")


class NoMesh(nnx.Module):
    @tp.region()
    def loss(self, batch):
        return batch.sum(), {}


def test_region_refuses_rows_that_do_not_split():
    encoder = Encoder(tp.make_mesh(data=2, tensor=4), rngs=nnx.Rngs(0))
    batch = {key: value[:3] for key, value in encoder_batch(np.random.default_rng(0)).items()}
    with pytest.raises(tp.BadInput, match=r"Encoder: batch size 3 must be divisible by the batch axes' ranks \(data 2 = 2\)"):
        encoder.loss(batch)
    with pytest.raises(tp.BadInput, match=r"NoMesh has no mesh: a model entering a region keeps its mesh as self\.mesh"):
        NoMesh().loss(np.zeros((2, 2)))


BAD_STEPS = [
    ("rows", dict(), {"tokens": np.zeros((3, SEQ), np.int32)},
     r"every batch array needs rows on dim 0 divisible by data x expert x fsdp x grad_accum = 2; got shape \(3, 8\)"),
    ("scalar", dict(), {"scale": np.float32(1.0)}, r"every batch array needs rows on dim 0 .* got shape \(\)"),
    ("accumulation", dict(grad_accum=2), {"tokens": np.zeros((2, SEQ), np.int32)},
     r"divisible by data x expert x fsdp x grad_accum = 4; got shape \(2, 8\)"),
    ("policy", dict(on_nonfinite="ignore"), None, r"on_nonfinite must be 'stop' or 'skip', got 'ignore'"),
    ("grad_accum", dict(grad_accum=0), None, r"grad_accum must be a positive integer, got 0"),
]


@pytest.mark.parametrize("options, batch, message", [case[1:] for case in BAD_STEPS], ids=[case[0] for case in BAD_STEPS])
def test_bad_step_input_is_one_sentence(options, batch, message):
    model = Encoder(tp.make_mesh(data=2, tensor=4), rngs=nnx.Rngs(0))
    optimizer = tp.create_optimizer(model, optax.sgd(LR))
    with pytest.raises(tp.BadInput, match=message):
        tp.TrainStep(model, optimizer, lambda model, batch: model.loss(batch), **options)(batch)
