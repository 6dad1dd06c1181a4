"""Corpora as byte-level tokens (``run/tokens.py``), and deterministic,
resumable batches.

Three sources, chosen by the ``data`` section of the config:

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

:class:`Batches` cuts the token stream into non-overlapping windows of
``seq_len + 1`` tokens and visits them in a fresh random order every epoch.
``Batches.batch(step)`` is a pure function of (seed, step), so a checkpoint
only needs the step number to resume the data stream exactly.
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

from lite_tp_jax.run.config import DataConfig
from lite_tp_jax.run.tokens import BYTE_VOCAB_SIZE, DataError


TEXT_SUFFIXES = (".txt", ".md", ".py")
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib"})


def _bytes_to_tokens(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def _concat_files(files: list[Path], max_bytes: int | None = None) -> bytes:
    """The files' bytes joined by newlines, stopping once ``max_bytes`` are read."""
    parts: list[bytes] = []
    size = 0
    for i, file in enumerate(files):
        if max_bytes is not None and size >= max_bytes:
            break
        if i:
            parts.append(b"\n")
            size += 1
        data = file.read_bytes()
        parts.append(data)
        size += len(data)
    data = b"".join(parts)
    return data if max_bytes is None else data[:max_bytes]


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


def _text_files(path: str | os.PathLike) -> list[Path]:
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
    tokens = _bytes_to_tokens(_concat_files(_text_files(path)))
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
    raise DataError(f"unknown data.source {source!r}; allowed: stdlib, text, tokens")


# --------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------


class Batches:
    """Deterministic batches of ``seq_len``-token windows, reshuffled every epoch.

    The stream is cut into ``num_windows`` non-overlapping windows of
    ``seq_len + 1`` tokens (a tail shorter than that is dropped). Sequence number
    ``g`` (counting from 0 across epochs) is window
    ``permutation(epoch)[g % num_windows]`` with ``epoch = g // num_windows`` and
    ``permutation(e) = np.random.default_rng([seed, e]).permutation(num_windows)``.
    ``batch(position)`` holds sequences ``position * global_batch`` to
    ``(position + 1) * global_batch - 1``; a batch may straddle two epochs.
    """

    def __init__(self, tokens: np.ndarray, global_batch: int, seq_len: int, seed: int):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise DataError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        if global_batch < 1 or seq_len < 1:
            raise DataError(f"global_batch and seq_len must be >= 1, got {global_batch} and {seq_len}")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        self.tokens = tokens
        self.global_batch = int(global_batch)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.window = self.seq_len + 1
        self.num_windows = tokens.size // self.window
        if self.num_windows < self.global_batch:
            raise DataError(
                f"the corpus has {tokens.size} tokens, i.e. {self.num_windows} windows of "
                f"seq_len + 1 = {self.window} tokens, fewer than global_batch = {self.global_batch}; "
                f"use more data or a smaller train.seq_len or train.global_batch"
            )
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The order in which ``epoch`` visits the windows (cached for two epochs)."""
        perm = self._permutations.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = perm
        return perm

    def window_indices(self, position: int) -> np.ndarray:
        """Which windows (by index into the stream) make up ``batch(position)``."""
        position = int(position)
        if position < 0:
            raise DataError(f"batch position must be >= 0, got {position}")
        sequence = position * self.global_batch + np.arange(self.global_batch, dtype=np.int64)
        epochs, offsets = np.divmod(sequence, self.num_windows)
        out = np.empty(self.global_batch, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self.permutation(int(epoch))[offsets[mask]]
        return out

    def batch(self, position: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets): int32 ``[global_batch, seq_len]``, targets one token
        ahead; only the batch rows ``rows`` if given."""
        starts = self.window_indices(position)[rows] * self.window
        rows = np.asarray(self.tokens[starts[:, None] + np.arange(self.window)], dtype=np.int32)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def __repr__(self) -> str:
        return (
            f"Batches(tokens={self.tokens.size}, global_batch={self.global_batch}, "
            f"seq_len={self.seq_len}, seed={self.seed}, windows={self.num_windows})"
        )


def process_rows(sharding, global_shape: tuple[int, ...]) -> slice:
    """The batch rows that this process's devices hold under ``sharding``: one block."""
    index = sharding.addressable_devices_indices_map(global_shape).values()
    blocks = sorted({rows.indices(global_shape[0])[:2] for rows, *_ in index})
    if any(stop != start for (_, stop), (start, _) in zip(blocks, blocks[1:])):
        raise DataError(f"this process's devices hold batch rows {blocks}, which are not one block")
    return slice(blocks[0][0], blocks[-1][1])


def device_batch(batches: Batches, position: int, sharding) -> tuple:
    """``batches.batch(position)`` as two global arrays sharded by ``sharding``;
    this process reads and transfers only the rows its devices hold."""
    shape = (batches.global_batch, batches.seq_len)
    rows = process_rows(sharding, shape)
    return tuple(
        jax.make_array_from_process_local_data(sharding, local, shape)
        for local in batches.batch(position, rows)
    )
