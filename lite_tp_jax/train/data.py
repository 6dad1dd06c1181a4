"""Corpora as byte-level tokens (``run/tokens.py``) or tokenized corpora
(``corpus.py``), and deterministic, resumable batches.

Four sources, chosen by the ``data`` section of the config:

* ``stdlib`` (default): the Python standard library's own ``.py`` sources,
  concatenated in sorted path order and cut at 4 MB. Present on every machine;
  identical wherever the same Python version is installed.
* ``text``: your own text, read as bytes. ``path`` is a file, a directory
  (searched recursively for *.txt, *.md and *.py, in sorted order) or a glob::

      lite-tp train configs/tiny.yaml --set data.source=text --set data.path=my_dir
      lite-tp train configs/tiny.yaml --set data.source=text --set 'data.path=notes/**/*.md'

* ``tokens``: a pre-tokenised 1-D integer ``.npy`` file (any tokenizer), every
  id below ``model.vocab_size``::

      lite-tp train configs/llama-1b.yaml --set data.source=tokens --set data.path=tokens.npy

  e.g. ``np.save("tokens.npy", np.asarray(ids, np.int32))`` after tokenising
  your documents with the tokenizer the model's vocab belongs to.
* ``tokenized``: a corpus directory written by ``lite-tp tokenize`` (any
  tokenizer; memory-mapped, never read whole)::

      lite-tp tokenize my_docs.jsonl corpus --tokenizer path/to/model_dir
      lite-tp train configs/llama-1b.yaml --set data.source=tokenized --set data.path=corpus

  or a mixture of several: ``data.sources: [{path: a, weight: 0.7}, {path: b, weight: 0.3}]``.

:class:`Batches` cuts the token stream into non-overlapping windows of
``seq_len + 1`` tokens, or with ``data.packing`` packs whole documents into
rows (``packing.py``: segment ids, the crossing target and prompt tokens not
trained on), and visits the rows in a fresh random order every epoch. With a
mixture, sample ``g`` of the run is first given a source by grain's
``MapDataset.mix`` (an exact, deterministic interleave in the weights'
proportions, random access by index), then that source's next row in its own
epoch order. ``Batches.batch(step)`` is a pure function of (seed, step), so a
checkpoint only needs the step number to resume the data stream exactly.
:func:`device_batch` puts a batch on the mesh; in a run of several processes
each one reads only the rows its own devices hold.
"""

from __future__ import annotations

import glob as globlib
import os
import sysconfig
from pathlib import Path

import jax
import numpy as np

from lite_tp_jax.run.config import Config, DataConfig
from lite_tp_jax.run.tokens import BYTE_VOCAB_SIZE, DataError
from lite_tp_jax.train.corpus import TokenizedCorpus
from lite_tp_jax.train.packing import Documents, PackedRows, StreamRows, make_rows


TEXT_SUFFIXES = (".txt", ".md", ".py")
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib"})


def _bytes_to_tokens(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def _concat_files(files: list[Path], max_bytes: int | None = None) -> bytes:
    """The files' bytes joined by newlines, stopping once ``max_bytes`` are read."""
    return _joined_files(files, max_bytes)[0]


def _joined_files(files: list[Path], max_bytes: int | None = None) -> tuple[bytes, np.ndarray]:
    """``_concat_files`` and the document ends: file i (with the newline after it) is one document."""
    parts: list[bytes] = []
    ends = [0]
    size = 0
    for i, file in enumerate(files):
        if max_bytes is not None and size >= max_bytes:
            break
        if i:
            parts.append(b"\n")
            size += 1
            ends.append(size)
        data = file.read_bytes()
        parts.append(data)
        size += len(data)
    data = b"".join(parts)
    if max_bytes is not None and len(data) > max_bytes:
        data = data[:max_bytes]
    ends = np.minimum(np.asarray([*ends, len(data)], np.int64), len(data))
    return data, np.unique(ends)


# --------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The standard library's .py files (no tests, idlelib, site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"the Python standard library directory {str(root)!r} does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_tokens(max_bytes: int = 4_000_000) -> np.ndarray:
    """Python's standard-library sources as byte tokens, cut at ``max_bytes``.

    Files in sorted path order joined by newlines; the cut is deterministic, so
    two calls (on the same Python version) return identical arrays.
    """
    if max_bytes < 1:
        raise DataError(f"max_bytes must be >= 1, got {max_bytes}")
    return _bytes_to_tokens(_concat_files(stdlib_files(), max_bytes))


def text_files(path: str | os.PathLike) -> list[Path]:
    """A file, a directory's *.txt, *.md, *.py (recursive, sorted), or a glob's files (sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file())
        if not files:
            raise DataError(
                f"the directory {str(p)!r} has no {', '.join('*' + s for s in TEXT_SUFFIXES)} files"
            )
        return files
    if globlib.has_magic(str(path)):
        files = sorted(Path(f) for f in globlib.glob(str(path), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"the glob {str(path)!r} matches no files")
        return files
    if p.exists():
        raise DataError(f"the text path {str(path)!r} is not a regular file or a directory (a FIFO, socket or "
                        f"device cannot be read as a corpus); give a file, a directory or a glob")
    raise DataError(f"the text path {str(path)!r} does not exist (expected a file, a directory or a glob)")


def text_tokens(path: str | os.PathLike) -> np.ndarray:
    """Byte tokens of a file, a directory (recursive *.txt, *.md, *.py) or a glob.

    Several files are joined by newlines in sorted path order.
    """
    tokens = _bytes_to_tokens(_concat_files(text_files(path)))
    if tokens.size == 0:
        raise DataError(f"the text at {str(path)!r} is empty")
    return tokens


def npy_tokens(path: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """A 1-D integer .npy of token ids, each in [0, vocab_size), as int32.

    The file is memory-mapped; an int32 file is returned without a copy (the
    array is then read-only).
    """
    where = repr(str(path))
    if Path(path).exists() and not Path(path).is_file():  # np.load would block on a FIFO
        raise DataError(f"the token file {where} is not a regular file; give a 1-D .npy array file")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"the token file {where} does not exist") from None
    except (OSError, ValueError) as error:
        raise DataError(f"the token file {where} is not a readable .npy array ({error})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise DataError(f"the token file {where} is not a single .npy array")
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"the token file {where} must hold a 1-D integer array, "
            f"got shape {array.shape} of dtype {array.dtype}"
        )
    if array.size:
        low, high = array.min(), array.max()
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            index = int(np.argmax(array == bad))
            raise DataError(
                f"the token file {where} has id {int(bad)} at index {index}, "
                f"outside [0, {vocab_size}) (model.vocab_size)"
            )
    return np.asarray(array, dtype=np.int32)


def load_tokens(data_config: DataConfig, vocab_size: int) -> np.ndarray:
    """The 1-D int32 token array that ``data_config`` describes."""
    source = data_config.source
    if source in ("stdlib", "text") and vocab_size < BYTE_VOCAB_SIZE:
        raise DataError(
            f"data.source {source!r} makes byte tokens, which need model.vocab_size >= "
            f"{BYTE_VOCAB_SIZE}, got {vocab_size}"
        )
    if source == "stdlib":
        return stdlib_tokens()
    if source in ("text", "tokens") and data_config.path is None:
        raise DataError(f"data.source {source!r} needs data.path")
    if source == "text":
        return text_tokens(data_config.path)
    if source == "tokens":
        return npy_tokens(data_config.path, vocab_size)
    raise DataError(f"data.source {source!r} has no single token array; allowed: stdlib, text, tokens")


# --------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------


class Batches:
    """Deterministic batches of ``seq_len``-token rows, reshuffled every epoch.

    From ``tokens`` (a 1-D array): the stream is cut into ``num_windows``
    non-overlapping windows of ``seq_len + 1`` tokens (a tail shorter than
    that is dropped). Or from ``sources`` (``packing.StreamRows`` or
    ``PackedRows``, several with ``weights``: a mixture).

    Sequence number ``g`` (counting from 0 across epochs) of a single source
    is row ``permutation(epoch)[g % num_windows]`` with ``epoch = g //
    num_windows`` and ``permutation(e) = np.random.default_rng([seed,
    e]).permutation(num_windows)``. In a mixture, ``g`` is first mapped to
    (source k, its sequence number l) by ``mixture_selection``, then to row
    ``permutation_k(l // rows_k)[l % rows_k]`` with the generator seeded
    ``[seed, k, epoch]``. ``batch(position)`` holds sequences ``position *
    global_batch`` to ``(position + 1) * global_batch - 1``; a batch may
    straddle two epochs.
    """

    def __init__(
        self, tokens: np.ndarray | None, global_batch: int, seq_len: int, seed: int, *,
        sources: list[StreamRows | PackedRows] | None = None, weights: list[float] | None = None,
    ):
        if global_batch < 1 or seq_len < 1:
            raise DataError(f"global_batch and seq_len must be >= 1, got {global_batch} and {seq_len}")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        if sources is None:
            tokens = np.asarray(tokens)
            if tokens.ndim != 1:
                raise DataError(f"tokens must be a 1-D array, got shape {tokens.shape}")
            sources = [StreamRows(Documents(tokens), seq_len)]
        self.sources = list(sources)
        self.weights = [1.0] * len(self.sources) if weights is None else [float(w) for w in weights]
        self.packed = self.sources[0].packed
        self.global_batch = int(global_batch)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.window = self.seq_len + 1
        self.num_windows = sum(source.num_rows for source in self.sources)
        single = self.sources[0]
        if len(self.sources) == 1 and self.num_windows < self.global_batch:
            what = f"{single.documents.tokens.size} tokens, i.e. {self.num_windows} " + (
                f"packed rows of seq_len = {self.seq_len}" if self.packed else f"windows of seq_len + 1 = {self.window} tokens"
            )
            raise DataError(
                f"the corpus has {what}, fewer than global_batch = {self.global_batch}; "
                f"use more data or a smaller train.seq_len or train.global_batch"
            )
        self._select = mixture_selection(self.weights) if len(self.sources) > 1 else None
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    @property
    def tokens(self) -> np.ndarray:
        return self.sources[0].documents.tokens

    def permutation(self, epoch: int, source: int = 0) -> np.ndarray:
        """The order in which ``epoch`` visits a source's rows (the last few cached)."""
        key = (source, epoch)
        perm = self._permutations.get(key)
        if perm is None:
            entropy = [self.seed, epoch] if self._select is None else [self.seed, source, epoch]
            perm = np.random.default_rng(entropy).permutation(self.sources[source].num_rows)
            if len(self._permutations) >= 2 * len(self.sources):
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[key] = perm
        return perm

    def _rows_of(self, source: int, sequence: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(sequence, self.sources[source].num_rows)
        out = np.empty(sequence.size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self.permutation(int(epoch), source)[offsets[mask]]
        return out

    def selection(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, row of that source) of each row of ``batch(position)``."""
        position = int(position)
        if position < 0:
            raise DataError(f"batch position must be >= 0, got {position}")
        sequence = position * self.global_batch + np.arange(self.global_batch, dtype=np.int64)
        if self._select is None:
            return np.zeros(self.global_batch, np.int64), self._rows_of(0, sequence)
        sources, local = self._select(sequence)
        rows = np.empty(self.global_batch, np.int64)
        for k in np.unique(sources):
            rows[sources == k] = self._rows_of(int(k), local[sources == k])
        return sources, rows

    def window_indices(self, position: int) -> np.ndarray:
        """Which windows (by index into the stream) make up ``batch(position)`` (one source)."""
        return self.selection(position)[1]

    def batch(self, position: int, rows: slice = slice(None)) -> tuple[np.ndarray, ...]:
        """``(inputs, targets)``, or packed ``(inputs, targets, segments)``: int32
        ``[global_batch, seq_len]`` (only the batch rows ``rows`` if given);
        targets one token ahead, -1 where not trained on."""
        sources, indices = (a[rows] for a in self.selection(position))
        parts = [np.empty((sources.size, self.seq_len), np.int32) for _ in range(3)]
        for k in np.unique(sources):
            for part, value in zip(parts, self.sources[int(k)].rows(indices[sources == k])):
                part[sources == k] = value
        return tuple(parts) if self.packed else tuple(parts[:2])

    def __repr__(self) -> str:
        return (
            f"Batches(sources={len(self.sources)}, global_batch={self.global_batch}, "
            f"seq_len={self.seq_len}, seed={self.seed}, rows={self.num_windows}, packed={self.packed})"
        )


def mixture_selection(weights: list[float]):
    """``select(g) -> (source, l)``: sample ``g`` of a run comes from source
    ``k`` as its ``l``-th sample. grain's ``MapDataset.mix`` of one index
    dataset per source: each source's count after n samples is within one of
    ``n * weight / sum(weights)`` (weights rounded to integers, the smallest
    to 100), the same for every process and any resume point."""
    import grain

    endless = 2**62
    tagged = [grain.MapDataset.range(endless).map(lambda i, k=k: (k, i)) for k in range(len(weights))]
    mixed = grain.MapDataset.mix(tagged, weights)

    def select(sequence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs = np.asarray(mixed._getitems([int(g) for g in sequence]), np.int64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]

    return select


def load_documents(data_config: DataConfig, vocab_size: int) -> list[tuple[str, Documents, float]]:
    """Each source's (name, documents, weight): one, or a mixture's ``data.sources``."""
    source = data_config.source
    if data_config.sources:
        return [
            (repr(path), _corpus_documents(path, vocab_size), float(weight)) for path, weight in data_config.sources
        ]
    if source == "tokenized":
        return [(repr(data_config.path), _corpus_documents(data_config.path, vocab_size), 1.0)]
    if source in ("stdlib", "text"):  # one document per file
        if vocab_size < BYTE_VOCAB_SIZE or (source == "text" and data_config.path is None):
            load_tokens(data_config, vocab_size)  # raises its error
        files = stdlib_files() if source == "stdlib" else text_files(data_config.path)
        data, ends = _joined_files(files, 4_000_000 if source == "stdlib" else None)
        if not data:
            raise DataError(f"the text at {str(data_config.path)!r} is empty")
        return [(source, Documents(_bytes_to_tokens(data), ends), 1.0)]
    return [(repr(data_config.path), Documents(load_tokens(data_config, vocab_size)), 1.0)]


def _corpus_documents(path: str, vocab_size: int) -> Documents:
    corpus = TokenizedCorpus(path, vocab_size)
    return Documents(corpus.tokens, corpus.ends, corpus.prompts)


def make_batches(config: Config) -> Batches:
    """The ``Batches`` that ``config``'s data and train sections describe."""
    data, train = config.data, config.train
    loaded = load_documents(data, config.model.vocab_size)
    sources = [make_rows(documents, train.seq_len, data.packing, name) for name, documents, _ in loaded]
    return Batches(None, train.global_batch, train.seq_len, train.seed, sources=sources, weights=[w for *_, w in loaded])


def process_rows(sharding, global_shape: tuple[int, ...]) -> slice:
    """The batch rows that this process's devices hold under ``sharding``: one block."""
    index = sharding.addressable_devices_indices_map(global_shape).values()
    blocks = sorted({rows.indices(global_shape[0])[:2] for rows, *_ in index})
    if any(stop != start for (_, stop), (start, _) in zip(blocks, blocks[1:])):
        raise DataError(f"this process's devices hold batch rows {blocks}, which are not one block")
    return slice(blocks[0][0], blocks[-1][1])


def device_batch(batches: Batches, position: int, sharding) -> tuple:
    """``batches.batch(position)`` as global arrays (two, or three packed) sharded
    by ``sharding``; this process reads and transfers only the rows its devices hold."""
    shape = (batches.global_batch, batches.seq_len)
    rows = process_rows(sharding, shape)
    return tuple(
        jax.make_array_from_process_local_data(sharding, local, shape)
        for local in batches.batch(position, rows)
    )
