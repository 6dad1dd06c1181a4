"""``lite-tp tokenize`` and tokenized corpora: every input kind and tokenizer
decodes back to its documents; the smallest dtype; memory-mapped reading
(resident memory does not grow with the file); an interrupted run leaves
nothing; bad input is one line, exit 2."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from lite_tp_jax.cli import main
from lite_tp_jax.run.tokenizer import HFTokenizer, load_tokenizer
from lite_tp_jax.run.tokens import DataError
from lite_tp_jax.train.corpus import CorpusWriter, TokenizedCorpus, token_dtype
from lite_tp_jax.train.data import Batches
from lite_tp_jax.train.packing import Documents, PackedRows
from lite_tp_jax.train.tokenize import Fields, tokenize

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
DOCS = ["def f(x):\n    return x + 1\n", "naïve café — 日本語 🙂", "print('hello world')\n" * 3, "a"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small byte-level BPE trained here with the tokenizers package (vocabulary < 65536: uint16)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(DOCS * 20, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def decoded(corpus: TokenizedCorpus, tokenizer) -> list[str]:
    return [tokenizer.decode(corpus.document(i)) for i in range(corpus.num_documents)]


def test_text_files_with_bytes_round_trip(tmp_path):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"{i}.txt").write_text(doc)
    meta = tokenize(str(tmp_path), tmp_path / "out", load_tokenizer("bytes"), chunk_bytes=16, show_progress=False)
    corpus = TokenizedCorpus(tmp_path / "out", vocab_size=256)
    assert meta["dtype"] == "uint8" and corpus.tokens.dtype == np.uint8 and isinstance(corpus.tokens, np.memmap)
    assert decoded(corpus, load_tokenizer("bytes")) == DOCS
    assert not corpus.has_prompts()


def test_jsonl_and_dataset_with_a_tokenizer_json_round_trip(tmp_path, bpe):
    import datasets

    tokenizer = load_tokenizer(bpe.parent)  # a model directory holding tokenizer.json
    assert isinstance(tokenizer, HFTokenizer) and 256 < tokenizer.vocab_size <= 400
    write_jsonl(tmp_path / "docs.jsonl", [{"body": d, "id": i} for i, d in enumerate(DOCS)])
    tokenize(str(tmp_path / "docs.jsonl"), tmp_path / "a", tokenizer, fields=Fields("body"), chunk_bytes=8, show_progress=False)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": DOCS})}).save_to_disk(str(tmp_path / "ds"))
    tokenize(str(tmp_path / "ds"), tmp_path / "b", tokenizer, fields=Fields("body"), show_progress=False)
    for out in ("a", "b"):
        corpus = TokenizedCorpus(tmp_path / out, vocab_size=400)
        assert corpus.dtype == np.uint16
        assert decoded(corpus, tokenizer) == DOCS
        assert corpus.num_tokens < sum(len(d.encode()) for d in DOCS)  # merges were used


def test_instruction_data_marks_the_prompt(tmp_path, bpe):
    tokenizer = load_tokenizer(bpe)
    records = [{"q": "def f(x):", "a": "\n    return x + 1\n"}, {"q": "print(", "a": "'hello world')"}]
    write_jsonl(tmp_path / "sft.jsonl", records)
    tokenize(str(tmp_path / "sft.jsonl"), tmp_path / "out", tokenizer, fields=Fields(prompt="q", completion="a"),
             show_progress=False)
    corpus = TokenizedCorpus(tmp_path / "out")
    for i, record in enumerate(records):
        prompt = tokenizer.encode_batch([record["q"]])[0]
        assert corpus.prompts[i] == prompt.size
        np.testing.assert_array_equal(corpus.document(i)[: prompt.size], prompt)
        assert tokenizer.decode(corpus.document(i)[prompt.size :]) == record["a"]


def test_sentencepiece_round_trip(tmp_path):
    import sentencepiece

    (tmp_path / "train.txt").write_text("\n".join(["the quick brown fox jumps over the lazy dog"] * 50))
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=30,
        character_coverage=1.0, normalization_rule_name="identity", minloglevel=2,
    )
    docs = ["the lazy fox", "quick brown dog jumps"]
    write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    tokenizer = load_tokenizer(tmp_path / "sp.model")
    tokenize(str(tmp_path / "d.jsonl"), tmp_path / "out", tokenizer, show_progress=False)
    corpus = TokenizedCorpus(tmp_path / "out", vocab_size=30)
    assert corpus.dtype == np.uint8 and decoded(corpus, tokenizer) == docs


def test_dtype_is_the_smallest_unsigned_that_holds_the_vocabulary():
    assert [token_dtype(v) for v in (256, 257, 65536, 65537, 128256)] == [np.uint8, np.uint16, np.uint16, np.uint32, np.uint32]


@pytest.mark.parametrize("vocab_size", [50_000, 128_256])  # uint16, uint32
def test_reading_is_memory_mapped(tmp_path, vocab_size):
    """A 64 MB token file: opening it and reading batches of packed and
    windowed rows leaves resident memory within a few MB of where it was (the
    kernel maps up to 64 KB around each row read: 80 rows here)."""
    writer = CorpusWriter(tmp_path, vocab_size, "test")
    rng = np.random.default_rng(0)
    per_doc = 1 << 16
    chunk = rng.integers(0, vocab_size, per_doc * 16)
    for _ in range((64 << 20) // (chunk.size * writer.dtype.itemsize)):
        writer.write(np.split(chunk, 16))
    writer.close()
    del chunk

    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    before = resident_mb()
    corpus = TokenizedCorpus(tmp_path, vocab_size)
    assert corpus.tokens.dtype == token_dtype(vocab_size) and corpus.tokens.nbytes == 64 << 20
    documents = Documents(corpus.tokens, corpus.ends, corpus.prompts)
    for rows in (PackedRows(documents, 4096), None):
        batches = Batches(corpus.tokens, 8, 4096, seed=0, sources=None if rows is None else [rows])
        for step in range(5):
            inputs, targets, *_ = batches.batch(step)
            assert inputs.max() < vocab_size and targets.max() < vocab_size
    assert resident_mb() - before < 16


def test_interrupted_tokenize_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C (and SIGTERM, which the command turns into it) in the middle of
    tokenizing: exit 130, and neither the output nor a partial one exists."""
    (tmp_path / "src").mkdir()
    for i in range(6):
        (tmp_path / "src" / f"{i}.txt").write_text("some text " * 50)
    calls = []

    def encode_then_terminate(self, texts):
        calls.append(len(texts))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return [np.frombuffer(t.encode(), np.uint8) for t in texts]

    from lite_tp_jax.run import tokenizer as tokenizer_module
    from lite_tp_jax.train import tokenize as tokenize_module

    monkeypatch.setattr(tokenizer_module.Bytes, "encode_batch", encode_then_terminate)
    monkeypatch.setitem(tokenize_module.tokenize.__kwdefaults__, "chunk_bytes", 100)  # a chunk per file
    listing = sorted(os.listdir(tmp_path))
    assert main(["tokenize", str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress"]) == 130
    assert len(calls) == 3 and sorted(os.listdir(tmp_path)) == listing
    assert signal.getsignal(signal.SIGTERM) is not None


# ---- bad input: one line, exit 2, nothing written ------------------------------


def _empty_file(tmp):
    (tmp / "empty.txt").write_text("")
    return [str(tmp / "empty.txt"), str(tmp / "out")]


def _jsonl(records, *flags):
    def make(tmp):
        write_jsonl(tmp / "d.jsonl", records)
        return [str(tmp / "d.jsonl"), str(tmp / "out"), *flags]

    return make


def _corpus_of_vocab(vocab_size, *overrides):
    def make(tmp):
        (tmp / "corpus").mkdir()
        writer = CorpusWriter(tmp / "corpus", vocab_size, "big.json")
        writer.write([np.arange(300) % vocab_size])
        writer.close()
        return ["train", TINY, "--no-progress", "--run-dir", str(tmp / "run"), "--set",
                "data.source=tokenized", f"data.path={tmp / 'corpus'}", *overrides]

    return make


def _out_exists(tmp):
    (tmp / "a.txt").write_text("x")
    (tmp / "out").mkdir()
    return [str(tmp / "a.txt"), str(tmp / "out")]


def _truncated_corpus(tmp):
    argv = _corpus_of_vocab(256)(tmp)
    with open(tmp / "corpus" / "tokens.bin", "r+b") as f:
        f.truncate(100)
    return argv


BAD = [
    ("empty-file", _empty_file, "holds no text to tokenize (empty files or fields)"),
    ("missing-field", _jsonl([{"text": "a"}, {"txt": "b"}]), "d.jsonl:2 has no field 'text' (fields: 'txt')"),
    ("field-not-a-string", _jsonl([{"text": 3}]), "d.jsonl:1 field 'text' is a int, not a string"),
    ("line-not-json", lambda tmp: (tmp / "d.jsonl").write_text('{"text": "a"}\nnot json\n') and [str(tmp / "d.jsonl"), str(tmp / "out")],
     "d.jsonl:2 is not valid JSON"),
    ("prompt-without-completion", _jsonl([{"q": "a"}], "--prompt-field", "q"),
     "instruction data needs both --prompt-field and --completion-field"),
    ("missing-tokenizer", _jsonl([{"text": "a"}], "--tokenizer", "/no/such/tokenizer.json"),
     "the tokenizer '/no/such/tokenizer.json' does not exist"),
    ("unreadable-tokenizer", lambda tmp: (tmp / "t.json").write_text("{}") and _jsonl([{"text": "a"}], "--tokenizer", str(tmp / "t.json"))(tmp),
     "is not a readable tokenizer.json"),
    ("output-exists", _out_exists, "already exists; remove it or choose another path"),
    ("missing-source", lambda tmp: [str(tmp / "nope.jsonl"), str(tmp / "out")], "nope.jsonl' does not exist"),
    ("tokenizer-bigger-than-model-vocab", _corpus_of_vocab(1000),
     "was tokenized with a vocabulary of 1000 ids (big.json) but model.vocab_size is 256"),
    ("missing-corpus", lambda tmp: ["train", TINY, "--run-dir", str(tmp / "run"), "--set", "data.source=tokenized",
                                    f"data.path={tmp / 'none'}"], "the corpus"),
    ("truncated-corpus", _truncated_corpus, "has a tokens.bin of 100 bytes, not the 300 x 1 its corpus.json says"),
]


@pytest.mark.parametrize("make", [b[1] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line(make, tmp_path, capsys):
    index = [b[1] for b in BAD].index(make)
    argv = make(tmp_path)
    argv = argv if argv[0] == "train" else ["tokenize", *argv, "--no-progress"]
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert BAD[index][2] in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no partial output


def test_reading_a_corpus_checks_its_files(tmp_path):
    with pytest.raises(DataError, match="is not a tokenized corpus"):
        TokenizedCorpus(tmp_path)
