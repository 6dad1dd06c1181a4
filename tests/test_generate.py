"""Generation with a KV cache against the path without one, on one device.

The cached path (left-padded prompts, prefill once, one token per decode step,
kv heads split over "tensor" or replicated) must give the same greedy tokens
as running the whole window through the unsharded model for every token, and
the same logits within 1e-5. The sampler keeps the logits split over the
vocabulary; its sampled frequencies are checked against softmax.
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import max_relative_error, tp_mesh
from lite_tp_jax.core import hlo
from lite_tp_jax.cli import main
from lite_tp_jax.inference.generator import Generator, greedy_without_cache, left_pad
from lite_tp_jax.inference.sampling import Sampling, pick
from lite_tp_jax.inference.text import TextStream
from lite_tp_jax.run.tokens import ByteTokenizer
from lite_tp_jax.core.axes import TENSOR
from lite_tp_jax.core.mesh import make_mesh
from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.models.transformer import Transformer

# GQA: 6 query heads in 2 kv groups. TP 2: one kv head per rank; TP 3 (uneven
# for the kv heads): kv heads replicated, 2 query heads per rank. Vocabulary 61
# is uneven at every degree.
GQA = ModelConfig(vocab_size=61, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, ffn_hidden_size=40)
# 3 kv heads at TP 2: kv groups padded 3 -> 4; data 2 x tensor 2.
PADDED_KV = ModelConfig(vocab_size=61, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=3, ffn_hidden_size=40)
PROMPTS = [[5, 17, 33, 2, 40], [7], [60, 1, 9]]  # per-row lengths, left-padded by the generator
NEW_TOKENS = 6


def _model(config: ModelConfig, mesh) -> Transformer:
    return Transformer(config, mesh=mesh, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens from the unsharded model without a cache, and (GQA) the logits of every position."""
    out = {}
    for name, config in (("gqa", GQA), ("padded_kv", PADDED_KV)):
        model = _model(config, tp_mesh(1))
        tokens = np.stack(list(greedy_without_cache(model, PROMPTS, NEW_TOKENS)), axis=1)  # [rows, new]
        logits = None
        if name == "gqa":
            window = np.zeros((len(PROMPTS), max(map(len, PROMPTS)) + NEW_TOKENS), np.int32)  # right-padded
            for row, (prompt, new) in enumerate(zip(PROMPTS, tokens)):
                window[row, : len(prompt) + NEW_TOKENS] = prompt + new.tolist()
            logits = np.asarray(model(jnp.asarray(window)))  # causal: padding after a row cannot change it
        out[name] = tokens, logits
    return out


CASES = {
    "gqa-tp1": (GQA, dict(tensor=1)),
    "gqa-tp2": (GQA, dict(tensor=2)),
    "gqa-tp3": (GQA, dict(tensor=3)),
    "padded_kv-data2-tp2": (PADDED_KV, dict(data=2, tensor=2)),
}


LOGITS_CASES = ("gqa-tp3",)  # logits compared too (two more compiles): uneven, kv heads replicated


@pytest.mark.parametrize("case", CASES)
def test_cached_greedy_equals_no_cache_path(case, reference):
    config, sizes = CASES[case]
    mesh = make_mesh(**sizes, devices=jax.devices()[: math.prod(sizes.values())])
    model = _model(config, mesh)
    expected_tokens, expected_logits = reference[case.split("-")[0]]

    got = np.stack(list(Generator(model).stream(PROMPTS, NEW_TOKENS)), axis=1)
    np.testing.assert_array_equal(got, expected_tokens)
    if case not in LOGITS_CASES:
        return

    # The logits of prefill and of two decode steps, for every left-padded row.
    tokens, start = left_pad(PROMPTS, mesh.shape["data"])
    width = tokens.shape[1]
    cache = model.new_cache(tokens.shape[0], width + 2)
    logits, cache = model.prefill(jnp.asarray(tokens), jnp.asarray(start), cache)
    steps = [logits]
    for step in range(2):
        new = np.zeros((tokens.shape[0], 1), np.int32)
        new[: len(PROMPTS), 0] = expected_tokens[:, step]
        logits, cache = model.decode(jnp.asarray(new), jnp.int32(width + step), jnp.asarray(start), cache)
        steps.append(logits)
    for row, prompt in enumerate(PROMPTS):
        for step, logits in enumerate(steps):
            want = expected_logits[row][len(prompt) - 1 + step]
            assert max_relative_error(np.asarray(logits)[row], want) <= 1e-5, (case, row, step)


@pytest.fixture(scope="module")
def tp3_model():
    return _model(GQA, tp_mesh(3))


def test_decode_step_communicates_only_what_the_math_needs(tp3_model):
    """Greedy decode step at TP 3: per layer one all-reduce of B x 1 x hidden
    after attention and one after the MLP, one for the embedding lookup; then
    three of B values: the split arg-max's pmax and pmin, and the pmin of the
    finite-logits flag. No all-gather: the logits are never gathered."""
    generator = Generator(tp3_model)
    batch, slots = 4, 16
    args = (
        generator.state, jnp.zeros((batch, 1), jnp.int32), jnp.int32(3), jnp.zeros(batch, jnp.int32),
        tp3_model.new_cache(batch, slots), jax.random.key(0),
    )
    text = generator._step.lower(*args).compile().as_text()
    counted = [(c.kind, c.elements, n) for c, n in hlo.collectives_per_step(text)]
    runs = {}
    for kind, elements, n in counted:
        runs[(kind, elements)] = runs.get((kind, elements), 0) + n
    hidden, layers = GQA.hidden_size, GQA.num_layers
    assert runs == {("all-reduce", batch * hidden): 1 + 2 * layers, ("all-reduce", batch): 3}, runs


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(temperature=0.7),
        Sampling(temperature=1.0, top_k=3),
        Sampling(temperature=1.0, top_p=0.6),
        Sampling(temperature=5.0, top_k=1),  # one token left: greedy
        Sampling(temperature=5.0, top_p=1e-6),
    ],
    ids=["temperature", "top_k", "top_p", "top_k=1", "top_p=1e-6"],
)
def test_split_vocabulary_sampler_matches_softmax(sampling):
    """``pick`` at TP 3 (vocabulary 7, padded to 9) over 6000 rows of the same
    logits: the token frequencies match the filtered softmax within 4 sigma."""
    rows, vocab = 6000, 7
    logits = np.array([2.0, 1.5, 0.3, -1.0, 1.2, 0.0, -0.5], np.float32)
    mesh = tp_mesh(3)
    padded = np.concatenate([logits, [0.0, 0.0]])  # padding holds junk: pick must mask it
    noise = np.asarray(jax.random.gumbel(jax.random.key(0), (rows, 9)))

    def body(logits, noise):
        return pick(jnp.broadcast_to(logits, (rows, 3)), noise, sampling, vocab, TENSOR)

    tokens, finite = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=(P(TENSOR), P(None, TENSOR)), out_specs=(P(), P()))
    )(padded, noise)
    assert np.asarray(finite).all()

    z = logits.astype(np.float64) / sampling.temperature
    order = np.argsort(-z)
    keep = np.ones(vocab, bool)
    if sampling.top_k:
        keep[order[sampling.top_k:]] = False
    if sampling.top_p < 1:
        p = np.exp(z - z.max()) * keep
        p /= p.sum()
        before = np.cumsum(p[order]) - p[order]
        keep[order[before >= sampling.top_p]] = False
    expected = np.exp(z - z.max()) * keep
    expected /= expected.sum()
    observed = np.bincount(np.asarray(tokens), minlength=9) / rows
    assert observed[vocab:].sum() == 0
    sigma = np.sqrt(expected * (1 - expected) / rows)
    assert np.all(np.abs(observed[:vocab] - expected) <= 4 * sigma + 1e-12), (observed, expected)


def test_sampled_tokens_do_not_depend_on_the_tp_degree(tp3_model):
    """The Gumbel noise is drawn for the logical vocabulary, so a seed gives the same tokens at TP 1 and 3."""
    sampling = Sampling(temperature=1.0)
    one = np.stack(list(Generator(_model(GQA, tp_mesh(1)), sampling).stream(PROMPTS, 4, seed=3)))
    three = np.stack(list(Generator(tp3_model, sampling).stream(PROMPTS, 4, seed=3)))
    np.testing.assert_array_equal(three, one)


def test_non_finite_parameters_stop_generation_with_one_sentence():
    model = _model(GQA, tp_mesh(1))
    model.final_norm.scale[...] = jnp.full_like(model.final_norm.scale[...], jnp.nan)
    with pytest.raises(FloatingPointError, match="logits are not finite at new token 1"):
        next(iter(Generator(model).stream(PROMPTS, 2)))


def test_text_stream_holds_back_incomplete_characters():
    stream = TextStream(ByteTokenizer())
    pieces = [stream.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]


def test_left_pad_rejects_empty_prompts():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        left_pad([[1], []], 1)


# --- lite-tp generate ------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-new-tokens", "-1"], "max_new_tokens must be an integer >= 0, got -1"),
        (["--temperature", "nan"], "temperature must be a finite number >= 0"),
        (["--temperature", "-0.5"], "temperature must be a finite number >= 0"),
        (["--top-k", "-2"], "top_k must be an integer >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--hf", "{tmp}/no-model"], "No config.json in"),
        (["--hf", "{tmp}/no-model", "--tensor", "0"], "--tensor must be a positive integer"),
        (["--hf", "{tmp}/no-model", "--run-dir", "{tmp}/run"], "not allowed with argument"),
        (["--hf", "{tmp}/no-model", "--step", "3"], "--step chooses a checkpoint of a --run-dir; a --hf model has none."),
    ],
)
def test_cli_generate_checks_its_arguments_before_loading(flags, message, capsys, tmp_path):
    """The run directory does not exist: the argument error comes first, and nothing is created."""
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    source = [] if "--hf" in flags else ["--run-dir", str(tmp_path / "run")]
    try:
        code = main(["generate", *source, "--prompt", "x", *flags])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "no-model").exists()


def _snapshot(directory):
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def test_cli_generate_streams_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """A run directory holding a checkpoint: stdout gets the prompt, then each
    piece of text as it is produced (flushed); the run directory is unchanged."""
    from lite_tp_jax.run.checkpoint import Checkpointer
    from lite_tp_jax.run.config_file import load_config, dump_config
    from lite_tp_jax.run.optimizer import create_model_and_optimizer
    from pathlib import Path

    run = tmp_path / "run"
    run.mkdir()
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    config = load_config(tiny, ["mesh.data=1", "mesh.tensor=2", "mesh.pipeline=1", "model.num_layers=1"])
    dump_config(config, run / "config.yaml")
    model, optimizer = create_model_and_optimizer(config.model, config.train, make_mesh(tensor=2, devices=jax.devices()[:2]))
    checkpointer = Checkpointer(run / "checkpoints", keep=1)
    checkpointer.save(1, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, {"step": 1, "data_position": 1})
    checkpointer.close()  # saves are asynchronous: finish and seal it
    before = _snapshot(run)

    class Recorder:
        def __init__(self):
            self.events = []

        def write(self, text):
            self.events.append(("write", text))

        def flush(self):
            self.events.append(("flush", None))

    recorder = Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    assert main(["generate", "--run-dir", str(run), "--prompt", "ab", "--max-new-tokens", "5"]) == 0
    writes = [text for kind, text in recorder.events if kind == "write"]
    assert writes[0] == "ab" and writes[-1] == "\n"
    assert len(writes) >= 3  # the prompt, at least one piece, the newline
    assert all(recorder.events[i + 1] == ("flush", None) for i, (k, _) in enumerate(recorder.events[:-1]) if k == "write")
    assert _snapshot(run) == before
    recorder.events.clear()  # --step 1 names the same (latest) checkpoint: the same greedy text
    assert main(["generate", "--run-dir", str(run), "--step", "1", "--prompt", "ab", "--max-new-tokens", "5"]) == 0
    assert [text for kind, text in recorder.events if kind == "write"] == writes

    # Only a checkpoint whose parameters are NaN (Checkpointer.save refuses to
    # write one, so its guard is bypassed here): restore skips it with a
    # warning and finds no intact one; exit 2 with one error line, not NUL bytes.
    from lite_tp_jax.run import checkpoint as checkpoint_module

    state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    state = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint_module, "first_non_finite", lambda arrays: None)
    checkpointer = Checkpointer(run / "checkpoints", keep=1)
    checkpointer.save(2, state, {"step": 2, "data_position": 2})
    checkpointer.close()  # rotation (keep=1) removes checkpoint 1
    monkeypatch.undo()
    code = main(["generate", "--run-dir", str(run), "--prompt", "ab", "--max-new-tokens", "5"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("lite-tp: warning:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and "No intact checkpoint" in errors[0], err


def test_cache_refuses_what_it_cannot_serve():
    """Sequence parallelism and pipeline stages are not used when generating: one sentence says how to load instead."""
    from dataclasses import replace

    with pytest.raises(ValueError, match="needs a model built with mesh.pipeline=1 and sequence_parallel=false"):
        _model(replace(GQA, sequence_parallel=True), tp_mesh(2)).new_cache(2, 8)
    with pytest.raises(ValueError, match="batch 3 must be divisible by mesh data x expert x fsdp = 2"):
        _model(PADDED_KV, make_mesh(data=2, tensor=2, devices=jax.devices()[:4])).new_cache(3, 8)  # meshes and shapes of the cases above


def test_cli_generate_from_a_hugging_face_checkpoint(capsys):
    """``--hf`` on the stored tiny GPT-2 (learned positions, LayerNorm, biases, fused
    c_attn) at TP 3 with the cache prints the text of the no-cache greedy tokens of
    the unsharded model (no tokenizer.json, vocabulary 101: byte-level)."""
    from pathlib import Path

    from lite_tp_jax import from_pretrained

    gpt2 = Path(__file__).resolve().parent / "data" / "hf" / "gpt2"
    unsharded = from_pretrained(gpt2, mesh=tp_mesh(1))
    expected = [int(t[0]) for t in greedy_without_cache(unsharded, [[97, 98]], 5)]
    code = main(["generate", "--hf", str(gpt2), "--tensor", "3", "--prompt", "ab", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert code == 0
    assert out == "ab" + ByteTokenizer().decode(expected) + "\n"

    # Logits with the cache at TP 3, left-padded rows: the learned positions count from each row's start.
    tokens, start = left_pad(PROMPTS, 1)
    model = from_pretrained(gpt2, mesh=tp_mesh(3))
    logits, _ = model.prefill(jnp.asarray(tokens), jnp.asarray(start), model.new_cache(len(PROMPTS), tokens.shape[1]))
    window = np.zeros((len(PROMPTS), tokens.shape[1]), np.int32)  # right-padded: one forward for every row
    for row, prompt in enumerate(PROMPTS):
        window[row, : len(prompt)] = prompt
    full = np.asarray(unsharded(jnp.asarray(window)))
    for row, prompt in enumerate(PROMPTS):
        assert max_relative_error(np.asarray(logits)[row], full[row, len(prompt) - 1]) <= 1e-5, row
