"""Byte tokenizer, corpora, and deterministic resumable batches."""

import numpy as np
import pytest

from lite_tp_jax.run.config import DataConfig
from lite_tp_jax.run.tokens import DataError, ids_to_text, text_to_ids
from lite_tp_jax.train.data import (
    Batches,
    load_tokens,
    npy_tokens,
    stdlib_files,
    stdlib_tokens,
    text_tokens,
)

# -- tokenizer -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "hello, world\n", "naïve café — 日本語 🙂", "\x00\x7f"])
def test_tokenizer_round_trip(text):
    ids = text_to_ids(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.size == len(text.encode("utf-8"))
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < 256)
    assert ids_to_text(ids) == text
    assert ids_to_text(ids.tolist()) == text


def test_decode_replaces_invalid_utf8():
    ids = text_to_ids("é")[:1]  # half of a two-byte character
    assert ids_to_text(ids) == "\ufffd"
    with pytest.raises(DataError, match="cannot decode id 256"):
        ids_to_text([104, 256])


# -- corpora -------------------------------------------------------------------


def test_stdlib_corpus_is_large_and_deterministic():
    a = stdlib_tokens()
    b = stdlib_tokens()
    assert a.dtype == np.int32 and a.ndim == 1
    assert 100_000 < a.size <= 4_000_000
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() < 256
    assert "def " in ids_to_text(a[:200_000])


def test_stdlib_corpus_truncates_deterministically():
    small = stdlib_tokens(max_bytes=1000)
    assert small.size == 1000
    np.testing.assert_array_equal(small, stdlib_tokens(max_bytes=5000)[:1000])


def test_stdlib_files_skip_tests_and_are_sorted():
    files = stdlib_files()
    assert len(files) > 100
    parts = {part for f in files for part in f.parts}
    assert not parts & {"site-packages", "test", "tests", "idlelib"}
    assert all(f.suffix == ".py" for f in files)
    assert any(f.name == "functools.py" for f in files)


def _make_tree(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "b" / "deep" / "c.md").write_text("gamma ü")
    (root / "b" / "x.py").write_text("print(1)")
    (root / "b" / "skip.bin").write_bytes(b"\x00\x01")
    return root


def test_text_directory_is_recursive_and_sorted(tmp_path):
    root = _make_tree(tmp_path)
    assert ids_to_text(text_tokens(root)) == "alpha\ngamma ü\nprint(1)"
    assert text_tokens(str(root)).dtype == np.int32


def test_text_file_and_glob(tmp_path):
    root = _make_tree(tmp_path)
    assert ids_to_text(text_tokens(root / "b" / "skip.bin")) == "\x00\x01"  # a named file is read whatever its suffix
    assert ids_to_text(text_tokens(str(root / "**" / "*.md"))) == "gamma ü"
    assert ids_to_text(text_tokens(str(root / "*" / "*.py"))) == "print(1)"


def test_text_errors_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.bin").write_bytes(b"x")
    with pytest.raises(DataError, match=r"the directory '.*empty' has no \*\.txt, \*\.md, \*\.py files"):
        text_tokens(empty)
    with pytest.raises(DataError, match=r"the glob '.*\*\.rst' matches no files"):
        text_tokens(str(tmp_path / "*.rst"))
    with pytest.raises(DataError, match=r"the text path '.*missing' does not exist"):
        text_tokens(tmp_path / "missing")
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(DataError, match=r"the text at '.*blank\.txt' is empty"):
        text_tokens(tmp_path / "blank.txt")


def test_npy_tokens(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.array([0, 5, 999], dtype=np.int64))
    ids = npy_tokens(path, vocab_size=1000)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [0, 5, 999])
    np.save(path, np.array([1, 2], dtype=np.uint16))
    np.testing.assert_array_equal(npy_tokens(str(path), 3), [1, 2])


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 3), np.int32), r"must hold a 1-D integer array, got shape \(2, 3\) of dtype int32"),
        (np.zeros(4, np.float32), r"must hold a 1-D integer array, got shape \(4,\) of dtype float32"),
        (np.zeros(4, bool), r"must hold a 1-D integer array, got shape \(4,\) of dtype bool"),
        (np.array([3, 1000, 7]), r"has id 1000 at index 1, outside \[0, 1000\)"),
        (np.array([3, -1, 7]), r"has id -1 at index 1, outside \[0, 1000\)"),
    ],
)
def test_npy_validation(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=r"^the token file '.*bad\.npy' " + message):
        npy_tokens(path, vocab_size=1000)


def test_npy_unreadable(tmp_path):
    with pytest.raises(DataError, match=r"the token file '.*nope\.npy' does not exist"):
        npy_tokens(tmp_path / "nope.npy", 10)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"the token file '.*objects\.npy' is not a readable \.npy array"):
        npy_tokens(tmp_path / "objects.npy", 10)
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match=r"the token file '.*junk\.npy' is not a readable \.npy array"):
        npy_tokens(tmp_path / "junk.npy", 10)


def test_load_tokens_dispatches(tmp_path):
    root = _make_tree(tmp_path)
    np.testing.assert_array_equal(
        load_tokens(DataConfig(source="text", path=str(root)), 256), text_tokens(root)
    )
    np.save(tmp_path / "t.npy", np.arange(10))
    np.testing.assert_array_equal(
        load_tokens(DataConfig(source="tokens", path=str(tmp_path / "t.npy")), 10), np.arange(10)
    )
    np.testing.assert_array_equal(load_tokens(DataConfig(), 300), stdlib_tokens())
    with pytest.raises(DataError, match=r"data\.source 'stdlib' makes byte tokens, .* >= 256, got 100"):
        load_tokens(DataConfig(), 100)
    with pytest.raises(DataError, match=r"data\.source 'text' makes byte tokens"):
        load_tokens(DataConfig(source="text", path=str(root)), 255)
    with pytest.raises(DataError, match=r"has id 9 at index 9, outside \[0, 9\)"):
        load_tokens(DataConfig(source="tokens", path=str(tmp_path / "t.npy")), 9)


# -- batches -------------------------------------------------------------------


def test_batch_shapes_and_shift():
    tokens = np.arange(1000, dtype=np.int32)
    batches = Batches(tokens, global_batch=4, seq_len=9, seed=0)
    assert batches.num_windows == 100
    inputs, targets = batches.batch(0)
    assert inputs.shape == targets.shape == (4, 9)
    assert inputs.dtype == targets.dtype == np.int32
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    np.testing.assert_array_equal(targets, inputs + 1)  # consecutive tokens
    assert np.all(inputs[:, 0] % 10 == 0)  # windows start at multiples of seq_len + 1


def test_batches_are_deterministic_in_seed_and_position():
    tokens = stdlib_tokens(max_bytes=50_000)
    a = Batches(tokens, global_batch=8, seq_len=32, seed=1)
    b = Batches(tokens, global_batch=8, seq_len=32, seed=1)
    c = Batches(tokens, global_batch=8, seq_len=32, seed=2)
    for position in (5, 0, 3, 500, 3):  # any order: a pure function of the position
        np.testing.assert_array_equal(a.batch(position)[0], b.batch(position)[0])
        np.testing.assert_array_equal(a.batch(position)[1], b.batch(position)[1])
    assert not np.array_equal(a.batch(0)[0], c.batch(0)[0])
    assert not np.array_equal(a.batch(0)[0], a.batch(1)[0])
    # A fresh object resuming at a step sees what the original saw there.
    np.testing.assert_array_equal(Batches(tokens, 8, 32, 1).batch(500)[0], a.batch(500)[0])


def test_epochs_cover_every_window_once_and_reshuffle():
    seq_len, batch = 4, 3
    num_windows = 10  # not a multiple of the batch: batches straddle epochs
    tokens = np.arange(num_windows * (seq_len + 1) + 3)  # a short tail is dropped
    batches = Batches(tokens, global_batch=batch, seq_len=seq_len, seed=0)
    assert batches.num_windows == num_windows
    epochs = 4
    seen = np.concatenate(
        [batches.batch(p)[0][:, 0] // (seq_len + 1) for p in range(epochs * num_windows // batch + 1)]
    )
    orders = [seen[e * num_windows : (e + 1) * num_windows] for e in range(epochs)]
    for e, order in enumerate(orders):
        assert sorted(order.tolist()) == list(range(num_windows)), e
        np.testing.assert_array_equal(order, np.random.default_rng([0, e]).permutation(num_windows))
    assert len({tuple(o) for o in orders}) > 1  # a new order every epoch
    for p in range(20):
        np.testing.assert_array_equal(batches.window_indices(p), batches.batch(p)[0][:, 0] // (seq_len + 1))


def test_batches_errors():
    with pytest.raises(DataError, match=r"the corpus has 100 tokens, i\.e\. 1 windows of seq_len \+ 1 = 65 tokens, "
                                        r"fewer than global_batch = 2"):
        Batches(np.zeros(100, np.int32), global_batch=2, seq_len=64, seed=0)
    with pytest.raises(DataError, match=r"tokens must be a 1-D array"):
        Batches(np.zeros((10, 10), np.int32), global_batch=1, seq_len=4, seed=0)
    batches = Batches(np.zeros(100, np.int32), global_batch=1, seq_len=4, seed=0)
    with pytest.raises(DataError, match=r"batch position must be >= 0, got -1"):
        batches.batch(-1)


def test_batches_from_memory_mapped_tokens(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(200, dtype=np.int32))
    tokens = npy_tokens(tmp_path / "t.npy", 200)
    inputs, targets = Batches(tokens, global_batch=2, seq_len=9, seed=3).batch(7)
    assert type(inputs) is np.ndarray and inputs.flags.writeable and inputs.flags.c_contiguous
    np.testing.assert_array_equal(targets, inputs + 1)


# -- packing and mixtures --------------------------------------------------------

from lite_tp_jax.train.packing import Documents, PackedRows, StreamRows  # noqa: E402


def test_packed_rows_hold_whole_documents_with_their_targets():
    """Every document appears once (a long one cut into rows of seq_len), each
    segment's inputs are its tokens, targets the next token inside the
    document (-1 at its end and over the prompt), positions of padding 0."""
    rng = np.random.default_rng(0)
    lengths = [5, 1, 9, 30, 3, 12, 7, 0, 16, 4]  # 30 > seq_len: cut; 0: dropped
    docs = [rng.integers(1, 100, n).astype(np.int32) for n in lengths]
    prompts = np.zeros(len(docs), np.int64)
    prompts[2] = 4  # document 2: a 4-token prompt, its targets 1..3 are prompt tokens
    ends = np.cumsum([0, *lengths])
    seq_len = 16
    rows = PackedRows(Documents(np.concatenate(docs), ends, prompts), seq_len)
    inputs, targets, segments = rows.rows(np.arange(rows.num_rows))
    seen = []
    for r in range(rows.num_rows):
        for s in range(1, segments[r].max() + 1):
            where = np.flatnonzero(segments[r] == s)
            assert where[0] + where.size - 1 == where[-1]  # contiguous
            seen.append((inputs[r, where].tolist(), targets[r, where].tolist()))
        assert np.all(inputs[r][segments[r] == 0] == 0) and np.all(targets[r][segments[r] == 0] == -1)
    expected = []
    for d, doc in enumerate(docs):
        following = np.append(doc[1:], -1)
        following[: max(prompts[d] - 1, 0)] = -1
        for start in range(0, doc.size, seq_len):
            expected.append((doc[start : start + seq_len].tolist(), following[start : start + seq_len].tolist()))
    assert sorted(seen) == sorted(expected)
    assert rows.num_rows == 6 and rows.efficiency == sum(lengths) / (6 * seq_len)  # 87 tokens: 6 rows is the least


def test_stream_rows_mask_prompt_targets():
    docs = Documents(np.arange(20), np.array([0, 8, 20]), np.array([3, 0]))
    inputs, targets, _ = StreamRows(docs, 9).rows(np.array([0, 1]))
    np.testing.assert_array_equal(inputs, [np.arange(9), np.arange(10, 19)])
    np.testing.assert_array_equal(targets, [[-1, -1, 3, 4, 5, 6, 7, 8, 9], np.arange(11, 20)])


def test_mixture_proportions_and_purity():
    """Three sources weighted 5:3:2: over 10,000 samples each within 1% of its
    share; every batch a pure function of (seed, step); every source's rows
    reshuffled per epoch."""
    sources = [StreamRows(Documents(np.full(n * 5, k)), 4) for k, n in enumerate((40, 7, 300))]
    make = lambda: Batches(None, 100, 4, seed=3, sources=sources, weights=[5, 3, 2])  # noqa: E731
    batches = make()
    counts = np.zeros(3)
    for step in range(100):
        inputs, _ = batches.batch(step)
        counts += np.bincount(inputs[:, 0], minlength=3)
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.3, 0.2], atol=0.01)
    for step in (77, 3, 77):
        np.testing.assert_array_equal(make().batch(step)[0], batches.batch(step)[0])
        np.testing.assert_array_equal(batches.batch(step, slice(40, 60))[1], batches.batch(step)[1][40:60])
    # source 1 (7 rows) goes through ~430 epochs: each a permutation of its rows
    sources_of, rows_of = batches.selection(0)
    picked = np.concatenate([batches.selection(s)[1][batches.selection(s)[0] == 1] for s in range(3)])
    assert sorted(picked[:7].tolist()) == list(range(7)) and sorted(picked[7:14].tolist()) == list(range(7))
    assert picked[:7].tolist() != picked[7:14].tolist()


def test_make_batches_packs_the_stdlib_files():
    from lite_tp_jax.run.config_file import parse_config
    from lite_tp_jax.train.data import make_batches

    config = parse_config({"data": {"packing": True}, "train": {"global_batch": 4, "seq_len": 256}})
    inputs, targets, segments = make_batches(config).batch(2)
    assert inputs.shape == targets.shape == segments.shape == (4, 256)
    assert np.all(segments >= 0) and segments.max() >= 1
    starts = np.flatnonzero(np.diff(segments[0]) != 0)  # a document boundary: its last target is not trained on
    assert np.all(targets[0][starts] == -1)
