"""What a run's token ids are made of: UTF-8 bytes (vocab 256), so nothing
needs a tokenizer download; and ``DataError``, the one error for data a run
cannot use. Training reads corpora as byte ids (``train/data.py``); generation
turns ids back into text (``inference/text.py``)."""

from __future__ import annotations

import numpy as np

from lite_tp_jax.core.errors import BadInput

BYTE_VOCAB_SIZE = 256


class DataError(BadInput):
    """A data problem, described in one sentence that names the file or sizes."""


def text_to_ids(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int32 ids in [0, 256)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def ids_to_text(ids) -> str:
    """Text from byte ids; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= BYTE_VOCAB_SIZE):
        bad = ids[(ids < 0) | (ids >= BYTE_VOCAB_SIZE)][0]
        raise DataError(f"cannot decode id {int(bad)}: byte ids must be in [0, {BYTE_VOCAB_SIZE})")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class ByteTokenizer:
    """UTF-8 bytes as token ids (the tokenizer of ``lite-tp train``)."""

    def encode(self, text: str) -> list[int]:
        return text_to_ids(text).tolist()

    def decode(self, ids) -> str:
        return ids_to_text(np.asarray(ids, np.int32))
