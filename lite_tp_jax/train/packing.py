"""Rows of a batch cut from documents: a token stream cut into windows
(``StreamRows``), or whole documents packed into rows (``PackedRows``,
``data.packing: true``).

Both give, for a row index, ``inputs``, ``targets`` and ``segments``
(``int32 [seq_len]``). A target of -1 is not trained on (``Transformer.loss``):

* packed, a document's last token has no target (the next token belongs to
  another document), nor has padding (segment 0, token 0);
* a target that is a prompt token of instruction data (the document's first
  ``prompts[d]`` tokens) is -1 in both.

Packing is best-fit decreasing, computed once from the document lengths (no
randomness: the rows are shuffled per epoch by ``Batches``): documents longer
than a row are cut into rows of ``seq_len`` tokens first (a cut piece keeps its
next token as the target of its last); the rest, longest first, each go into
the open row with the least room that holds them, or a new row. Segment ids
number the pieces of a row from 1; positions restart at each (``layers/masks.py``).
"""

from __future__ import annotations

import bisect

import numpy as np

from lite_tp_jax.run.tokens import DataError


class Documents:
    """Token ids (1-D, any integer dtype, possibly memory-mapped), document
    ends ``[0, e1, ..., N]`` and each document's prompt length."""

    def __init__(self, tokens: np.ndarray, ends: np.ndarray | None = None, prompts: np.ndarray | None = None):
        self.tokens = tokens
        self.ends = np.asarray([0, tokens.size] if ends is None else ends, np.int64)
        self.prompts = None if prompts is None or not np.any(prompts) else np.asarray(prompts, np.int64)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.ends)


def _prompt_targets(documents: Documents, target_index: np.ndarray) -> np.ndarray:
    """True where the token at global ``target_index`` is a prompt token."""
    if documents.prompts is None:
        return np.zeros(target_index.shape, bool)
    doc = np.searchsorted(documents.ends, target_index, side="right") - 1
    doc = np.clip(doc, 0, documents.prompts.size - 1)
    return target_index - documents.ends[doc] < documents.prompts[doc]


class StreamRows:
    """Non-overlapping windows of ``seq_len + 1`` tokens of the concatenated
    documents (a tail shorter than that is dropped); documents attend across
    their boundaries, as in a plain token stream."""

    packed = False

    def __init__(self, documents: Documents, seq_len: int):
        self.documents, self.seq_len = documents, int(seq_len)
        self.window = self.seq_len + 1
        self.num_rows = documents.tokens.size // self.window

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index = np.asarray(indices, np.int64)[:, None] * self.window + np.arange(self.window)
        rows = np.asarray(self.documents.tokens[index], dtype=np.int32)
        inputs, targets = rows[:, :-1], rows[:, 1:].copy()
        targets[_prompt_targets(self.documents, index[:, 1:])] = -1
        return np.ascontiguousarray(inputs), targets, np.ones_like(inputs)


class PackedRows:
    """Whole documents packed into rows of ``seq_len`` tokens (best-fit decreasing)."""

    packed = True

    def __init__(self, documents: Documents, seq_len: int):
        self.documents, self.seq_len = documents, int(seq_len)
        starts, lengths, ends = _pieces(documents, self.seq_len)
        row, column = _best_fit_decreasing(lengths, self.seq_len)
        order = np.lexsort((column, row))
        self._start, self._length, self._doc_end = starts[order], lengths[order], ends[order]
        self._column = column[order]
        self.num_rows = int(row.max()) + 1 if row.size else 0
        self._row_first = np.searchsorted(row[order], np.arange(self.num_rows + 1))

    @property
    def efficiency(self) -> float:
        """The fraction of row slots holding a document token (not padding)."""
        return float(self._length.sum()) / max(self.num_rows * self.seq_len, 1)

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        shape = (indices.size, self.seq_len)
        inputs, targets, segments = np.zeros(shape, np.int32), np.full(shape, -1, np.int32), np.zeros(shape, np.int32)
        tokens = self.documents.tokens
        for r, row in enumerate(indices):
            for segment, p in enumerate(range(self._row_first[row], self._row_first[row + 1]), 1):
                start, length, column = self._start[p], self._length[p], self._column[p]
                span = slice(column, column + length)
                inputs[r, span] = tokens[start : start + length]
                has_next = min(length, self._doc_end[p] - start - 1)  # the targets inside the document
                index = start + 1 + np.arange(has_next)
                targets[r, column : column + has_next] = np.where(
                    _prompt_targets(self.documents, index), -1, np.asarray(tokens[index], np.int32)
                )
                segments[r, span] = segment
        return inputs, targets, segments


def _pieces(documents: Documents, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(global start, length, end of its document) of each piece: documents
    cut into pieces of at most ``seq_len`` tokens (empty ones dropped)."""
    lengths = documents.lengths
    counts = -(-lengths // seq_len)  # pieces per document (0 for an empty one)
    doc = np.repeat(np.arange(lengths.size), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    offset = (np.arange(doc.size) - first) * seq_len
    starts = documents.ends[doc] + offset
    return starts, np.minimum(lengths[doc] - offset, seq_len), documents.ends[doc + 1]


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each piece: longest first (ties in index order), each
    into the open row with the least room that holds it, else a new row."""
    row, column = np.empty(lengths.size, np.int64), np.empty(lengths.size, np.int64)
    rooms: list[int] = []  # sorted distinct room sizes of open rows
    open_rows: dict[int, list[int]] = {}  # room -> rows with that room (oldest first)
    used: list[int] = []  # tokens in each row
    for piece in np.argsort(-lengths, kind="stable"):
        length = int(lengths[piece])
        at = bisect.bisect_left(rooms, length)
        if at < len(rooms):
            room = rooms[at]
            r = open_rows[room].pop(0)
            if not open_rows[room]:
                del open_rows[room], rooms[at]
        else:
            r, room = len(used), capacity
            used.append(0)
        row[piece], column[piece] = r, used[r]
        used[r] += length
        left = room - length
        if left:
            if left not in open_rows:
                bisect.insort(rooms, left)
                open_rows[left] = []
            open_rows[left].append(r)
    return row, column


def make_rows(documents: Documents, seq_len: int, packing: bool, name: str = "the corpus") -> StreamRows | PackedRows:
    rows = (PackedRows if packing else StreamRows)(documents, seq_len)
    if rows.num_rows == 0:
        raise DataError(
            f"{name} has {documents.tokens.size} tokens, not one window of seq_len + 1 = {seq_len + 1}; "
            f"use more data or a smaller train.seq_len"
        )
    return rows
