"""Hugging Face interop: from_pretrained / save_pretrained / ``lite-tp convert``.

The reference logits under tests/data/hf/<family>/ were computed by
transformers' PyTorch implementation (tests/data/make_hf_references.py); the
tests compare against them on several meshes, always. Tests marked ``hf``
also run transformers live, when it is installed (the ``hf`` extra).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import max_relative_error
from lite_tp_jax import cli
from lite_tp_jax.interop import hf, hf_config
from lite_tp_jax.interop.errors import HFError
from lite_tp_jax.interop.hf import from_pretrained, save_pretrained
from lite_tp_jax.interop.safetensors_files import Checkpoint
from lite_tp_jax.core.mesh import make_mesh, make_mesh_for
from lite_tp_jax.sharding.state import export_state, flat_variables, logical_shape
from lite_tp_jax.run.config_file import load_config
from lite_tp_jax.run.checkpoint import Checkpointer
from lite_tp_jax.run.optimizer import create_model_and_optimizer

DATA = Path(__file__).resolve().parent / "data" / "hf"
FAMILIES = ("llama3", "llama2", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gpt2")
# (data, tensor): TP 1, 2, 4, uneven 3, and data 2 x tensor 2
MESHES = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 2))


def mesh_of(data: int, tensor: int, pipeline: int = 1, expert: int = 1):
    devices = jax.devices()[: data * pipeline * expert * tensor]
    return make_mesh(data=data, pipeline=pipeline, expert=expert, tensor=tensor, devices=devices)


def reference(family: str) -> tuple[np.ndarray, np.ndarray]:
    stored = np.load(DATA / family / "reference.npz")
    return stored["tokens"], stored["logits"]


# One forward per family (each compile costs seconds of CI time), the meshes
# spread so that every one is covered: TP 1, 2, 4, uneven 3 (twice), data 2 x
# tensor 2. test_every_mesh_holds_the_same_weights extends each family to all
# of them without compiling: the layers' math is tested at every degree in
# their own tests, the loader's slicing here.
FORWARD_MESH = {
    "llama2": [(1, 1)],
    "mistral": [(1, 2)],  # 3 kv heads over 2: kv groups padded to 4
    "llama3": [(1, 4)],  # 2 kv heads over 4: kv replicated, vocab 101 padded to 104
    "mixtral": [(1, 3)],  # experts' hidden 40 padded to 42
    "gpt2": [(1, 3)],
    "qwen2": [(2, 2)],
    # (data, tensor, pipeline, expert). Qwen3: q/k norms, head_dim 12 != 48 / 6.
    "qwen3": [(1, 1), (1, 3)],
    # top-3 of 8 experts of hidden 20 (7, 7, 6 at tensor 3); Qwen2-MoE: layer 0 dense, layer 1
    # experts (not renormalised) and a gated shared expert of hidden 28.
    "qwen3_moe": [(1, 2), (1, 2, 1, 2)],
    "qwen2_moe": [(1, 3), (1, 2, 1, 2)],
}
FORWARD_CASES = [(family, mesh) for family in FAMILIES for mesh in FORWARD_MESH[family]]


@pytest.mark.parametrize("family,mesh", FORWARD_CASES, ids=[f"{f}-{'x'.join(map(str, m))}" for f, m in FORWARD_CASES])
def test_logits_equal_transformers_reference(family, mesh):
    """Logits of the loaded model equal transformers' (stored) within 1e-4."""
    tokens, expected = reference(family)
    model = from_pretrained(DATA / family, mesh=mesh_of(*mesh))
    logits = model(jnp.asarray(tokens))
    assert logits.shape == expected.shape  # logical vocab 101, no padding
    assert max_relative_error(logits, expected) <= 1e-4


def test_gpt2_variants_loss_and_gradients_match_one_device():
    """The variants GPT-2 adds (LayerNorm, GeLU MLP, biases, learned
    positions), with sequence parallelism at data 2 x tensor 3: loss and every
    gradient equal the one-device ones (the reference model's biases and norms
    are random, so no gradient hides behind a zero)."""
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 101, (2, 7)), jnp.int32)
    config = hf_config.config_from_hf(json.loads((DATA / "gpt2" / "config.json").read_text()))

    def loss_and_grads(config, mesh):
        graphdef, state = nnx.split(hf.load_model(DATA / "gpt2", config, mesh=mesh))
        loss = lambda state: nnx.merge(graphdef, state).loss(tokens[:, :-1], tokens[:, 1:])[0]  # noqa: E731
        value, grads = jax.jit(jax.value_and_grad(loss))(state)
        return float(value), export_state(grads)

    loss_1, grads_1 = loss_and_grads(config, mesh_of(1, 1))
    loss_t, grads_t = loss_and_grads(dataclasses.replace(config, sequence_parallel=True), mesh_of(2, 3))
    assert abs(loss_t - loss_1) <= 1e-5 * abs(loss_1)
    for name in grads_1:
        if name.endswith("key.bias"):  # softmax ignores q . b_k (the same for every key): gradient 0 up to roundoff
            assert np.abs(grads_t[name]).max() <= 1e-8 and np.abs(grads_1[name]).max() <= 1e-8
            continue
        assert max_relative_error(grads_t[name], grads_1[name]) <= 1e-5, name


def stored_values(model) -> dict[str, tuple[np.ndarray, tuple[int, ...]]]:
    """Each parameter gathered to the host as stored (padded, stacked), with its logical shape."""
    return {name: (np.asarray(v.get_value()), logical_shape(v)) for name, v in flat_variables(model).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_mesh_holds_the_same_weights(family):
    """On every mesh (and pipeline 2 x tensor 2: layers split over stages,
    vocabulary over 4) the loaded parameters are the TP-1 ones, bit for bit,
    with zeros in the padding of uneven dims."""
    expected = {name: value for name, (value, _) in stored_values(from_pretrained(DATA / family, mesh=mesh_of(1, 1))).items()}
    for data, tensor, pipeline in [(d, t, 1) for d, t in MESHES[1:]] + [(1, 2, 2)]:
        mesh = mesh_of(data, tensor, pipeline)
        for name, (value, logical) in stored_values(from_pretrained(DATA / family, mesh=mesh)).items():
            trailing = logical[1:] if value.ndim > len(logical) else logical  # past the stacking dims
            real = value[(Ellipsis, *(slice(0, n) for n in trailing))].reshape(expected[name].shape)
            np.testing.assert_array_equal(real, expected[name], err_msg=f"{name} on {dict(mesh.shape)}")
            assert np.count_nonzero(value) == np.count_nonzero(real), f"{name}: padding is not zero"


def test_each_device_reads_only_its_slice(monkeypatch):
    """At TP 4 the vocabulary-split embedding is read as four disjoint row
    blocks (the last one short: 101 rows), never whole."""
    reads = []
    original = Checkpoint.read

    def spy(self, name, index):
        reads.append((name, tuple((s.start, s.stop) for s in index)))
        return original(self, name, index)

    monkeypatch.setattr(Checkpoint, "read", spy)
    from_pretrained(DATA / "llama3", mesh=mesh_of(1, 4))
    embedding_reads = sorted(index for name, index in reads if name == "model.embed_tokens.weight")
    assert embedding_reads == [((0, 26), (0, 48)), ((26, 52), (0, 48)), ((52, 78), (0, 48)), ((78, 101), (0, 48))]
    down_reads = {index for name, index in reads if name == "model.layers.1.mlp.down_proj.weight"}
    assert down_reads == {((0, 48), (0, 18)), ((0, 48), (18, 36)), ((0, 48), (36, 54)), ((0, 48), (54, 70))}


def checkpoint_tensors(directory: Path) -> dict[str, np.ndarray]:
    checkpoint = Checkpoint(directory)
    return {
        name: checkpoint.read(name, tuple(slice(0, n) for n in entry.shape)).astype(np.float32)
        for name, entry in checkpoint.entries.items()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_is_bit_exact(family, tmp_path):
    """Saved at TP 3 (split into several files with an index), the tensors equal
    the original checkpoint's bit for bit; loaded again at TP 2, every
    parameter equals the one saved."""
    model = from_pretrained(DATA / family, mesh=mesh_of(1, 3))
    save_pretrained(model, tmp_path / "saved", max_shard_bytes=40_000)
    assert (tmp_path / "saved" / "model.safetensors.index.json").exists()
    original, saved = checkpoint_tensors(DATA / family), checkpoint_tensors(tmp_path / "saved")
    assert sorted(saved) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(saved[name], original[name], err_msg=name)
    reloaded = from_pretrained(tmp_path / "saved", mesh=mesh_of(1, 2))
    before, after = export_state(model), export_state(reloaded)
    assert sorted(before) == sorted(after)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def copy_model(family: str, destination: Path, *, drop: str | None = None, config: dict | None = None) -> Path:
    """A copy of a reference model, without tensor ``drop`` or with config changes."""
    tensors = checkpoint_tensors(DATA / family)
    tensors.pop(drop, None)
    destination.mkdir()
    from safetensors.numpy import save_file

    save_file(tensors, destination / "model.safetensors")
    hf_config = json.loads((DATA / family / "config.json").read_text())
    (destination / "config.json").write_text(json.dumps({**hf_config, **(config or {})}))
    return destination


def test_gpt2_checkpoint_without_transformer_prefix(tmp_path):
    """Older GPT-2 checkpoints name tensors ``h.0.attn...`` rather than ``transformer.h.0...``."""
    tensors = {name.removeprefix("transformer."): value for name, value in checkpoint_tensors(DATA / "gpt2").items()}
    (tmp_path / "m").mkdir()
    from safetensors.numpy import save_file

    save_file(tensors, tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text((DATA / "gpt2" / "config.json").read_text())
    mesh = mesh_of(1, 2)
    unprefixed, prefixed = stored_values(from_pretrained(tmp_path / "m", mesh=mesh)), stored_values(from_pretrained(DATA / "gpt2", mesh=mesh))
    for name, (value, _) in prefixed.items():
        np.testing.assert_array_equal(unprefixed[name][0], value, err_msg=name)


def test_missing_tensor_is_named(tmp_path):
    path = copy_model("qwen2", tmp_path / "m", drop="model.layers.1.self_attn.k_proj.bias")
    with pytest.raises(HFError, match=r"lacks tensor 'model.layers.1.self_attn.k_proj.bias' \(expected shape \[16\]\)"):
        from_pretrained(path, mesh=mesh_of(1, 2))


def test_unsupported_architecture_is_named(tmp_path):
    path = copy_model("llama3", tmp_path / "m", config={"model_type": "falcon"})
    with pytest.raises(HFError, match="model_type 'falcon' is not supported; supported: llama, mistral"):
        from_pretrained(path, mesh=mesh_of(1, 1))


def test_shape_mismatch_is_named(tmp_path):
    path = copy_model("llama3", tmp_path / "m", config={"intermediate_size": 64})
    with pytest.raises(HFError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \[70, 48\], config.json implies \[64, 48\]"):
        from_pretrained(path, mesh=mesh_of(1, 1))


def test_damaged_hugging_face_files_are_bad_input_not_a_traceback(tmp_path, capsys):
    """Only ``BadInput`` exits 2: a config.json that is not JSON, or lacks a field,
    and a safetensors header that is not JSON are ``HFError``s, not ValueErrors."""
    broken = copy_model("llama3", tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(HFError, match=r"config.json is not valid JSON"):
        hf_config.read_hf_config(broken)
    assert cli.main(["generate", "--hf", str(broken), "--prompt", "a", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "config.json is not valid JSON" in err and "Traceback" not in err
    lacking = copy_model("llama3", tmp_path / "lacking")
    config = json.loads((lacking / "config.json").read_text())
    del config["hidden_size"]
    (lacking / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFError, match=r"lacking/config.json \(model_type 'llama'\) lacks the field 'hidden_size'"):
        from_pretrained(lacking, mesh=mesh_of(1, 1))
    garbled = copy_model("llama3", tmp_path / "garbled")
    data = (garbled / "model.safetensors").read_bytes()
    (garbled / "model.safetensors").write_bytes(data[:8] + b"!" * 16 + data[24:])
    with pytest.raises(HFError, match=r"is not a safetensors file \(its header is not JSON\)"):
        Checkpoint(garbled)


def test_save_refuses_to_overwrite(tmp_path):
    model = from_pretrained(DATA / "llama2", mesh=mesh_of(1, 1))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(HFError, match="exists and is not empty"):
        save_pretrained(model, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_convert_round_trip_and_resume_on_another_mesh(tmp_path):
    """``convert --from-hf`` (loaded at TP 1) then ``--to-hf`` reproduces the
    original tensors; ``lite-tp train`` on the run directory with another mesh
    (TP 3) restores the converted step-0 checkpoint (``Checkpointer.restore``,
    as ``Trainer`` does) with the same weights."""
    run = tmp_path / "run"
    assert cli.main(["convert", "--from-hf", str(DATA / "gpt2"), "--run-dir", str(run)]) == 0
    assert cli.main(["convert", "--to-hf", str(tmp_path / "back"), "--run-dir", str(run)]) == 0
    original, back = checkpoint_tensors(DATA / "gpt2"), checkpoint_tensors(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(back[name], original[name], err_msg=name)

    config = load_config(run / "config.yaml", ["mesh.tensor=3"])
    mesh = make_mesh_for(config.mesh.requested, spares=config.mesh.spares)
    model, optimizer = nnx.eval_shape(lambda: create_model_and_optimizer(config.model, config.train, mesh))
    progress = Checkpointer(run / "checkpoints", keep=1).restore({"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, mesh)
    assert progress["step"] == 0  # `lite-tp train` resumes here, as from any checkpoint
    loaded = export_state(from_pretrained(DATA / "gpt2", mesh=mesh_of(1, 1)))
    resumed = export_state(model)
    for name in loaded:
        np.testing.assert_array_equal(resumed[name], loaded[name], err_msg=name)


def test_convert_bad_input_exits_2(tmp_path, capsys):
    assert cli.main(["convert", "--from-hf", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "has no config.json" in error
    assert not (tmp_path / "run").exists()


# --- live parity with transformers (the ``hf`` extra) -------------------------------


@pytest.mark.hf
@pytest.mark.parametrize("family", FAMILIES)
def test_live_transformers_parity(family, tmp_path):
    """Our logits equal transformers' on the reference model, and transformers
    loads what ``save_pretrained`` writes and computes the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokens, _ = reference(family)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(DATA / family, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(torch.from_numpy(tokens).long()).logits.numpy()
    model = from_pretrained(DATA / family, mesh=mesh_of(1, 3))
    assert max_relative_error(model(jnp.asarray(tokens)), expected) <= 1e-4
    save_pretrained(model, tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    with torch.no_grad():
        again = reloaded(torch.from_numpy(tokens).long()).logits.numpy()
    assert max_relative_error(again, expected) <= 1e-5


def test_the_docs_name_every_config_json_key_that_is_read():
    """docs/huggingface.md stays true: each key hf_config.py reads is listed there."""
    import re

    repo = DATA.parents[2]
    source = (repo / "lite_tp_jax" / "interop" / "hf_config.py").read_text()
    keys = set(re.findall(r'hf(?:\.get\(|\[)"([a-z_]+)"', source))
    docs = (repo / "docs" / "huggingface.md").read_text()
    assert keys and not sorted(k for k in keys if f"`{k}`" not in docs)


SLIDING_CONFIGS = [  # (family, config.json changes, the window lite_tp_jax applies, or the error)
    ("mistral", {"sliding_window": 3}, 3),
    ("mixtral", {"sliding_window": 5}, 5),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 0, "layer_types": None}, 3),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "layer_types": ["sliding_attention"] * 2}, 3),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 3, "max_window_layers": 0}, None),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2, "layer_types": None}, None),  # no layer slides
    ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1, "layer_types": None},
     "a sliding window on 1 of 2 layers is not supported"),
    ("mistral", {"sliding_window": 0}, "sliding_window must be a positive integer or null, got 0"),
]


@pytest.mark.parametrize("family, changes, expected", SLIDING_CONFIGS)
def test_sliding_windows_are_read_and_written_back(family, changes, expected):
    """Sliding windows are applied (no refusal, no "equal up to the window"):
    read from config.json, and written back so that they read the same."""
    hf = {**json.loads((DATA / family / "config.json").read_text()), **changes}
    if isinstance(expected, str):
        with pytest.raises(HFError, match=expected):
            hf_config.config_from_hf(hf)
        return
    config = hf_config.config_from_hf(hf)
    assert config.sliding_window == expected
    written = hf_config.config_to_hf(config)
    assert written["model_type"] == ("mistral" if family == "mistral" and expected else "llama" if family == "mistral" else family)
    assert hf_config.config_from_hf(written) == dataclasses.replace(config, head_dim=config.resolved_head_dim)


def test_mistral_with_a_sliding_window_runs_past_it():
    """The reference Mistral with a window of 3: positions 0-2 are the
    full-attention reference (transformers' logits), later ones are not (the
    mask itself is tested against dense loops at every kernel, test_masks.py)."""
    tokens, expected = reference("mistral")
    raw = json.loads((DATA / "mistral" / "config.json").read_text())
    model = hf.load_model(DATA / "mistral", hf_config.config_from_hf({**raw, "sliding_window": 3}), mesh=mesh_of(1, 2))
    logits = np.asarray(model(jnp.asarray(tokens)))
    assert max_relative_error(logits[:, :3], expected[:, :3]) <= 1e-4
    assert np.abs(logits[:, 3:] - expected[:, 3:]).max(axis=-1).min() > 1e-3  # every later position changed
