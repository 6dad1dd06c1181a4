"""The tokenizer of a corpus: a Hugging Face ``tokenizer.json`` (the
``tokenizers`` package), a sentencepiece model, or UTF-8 bytes.

``load_tokenizer(spec)``: ``"bytes"``; a ``tokenizer.json`` file; a
sentencepiece ``.model`` file; or a directory holding either (a model
directory that ``from_pretrained`` loads has its tokenizer beside its
``config.json``). Every tokenizer encodes a list of texts at once on every
core (``tokenizers``' Rust thread pool, sentencepiece's ``num_threads``),
without special tokens: document boundaries are kept by the corpus's index,
not by separator ids.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from lite_tp_jax.run.tokens import BYTE_VOCAB_SIZE, DataError, ids_to_text

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"


class Tokenizer(Protocol):
    name: str  # what it was loaded from: "bytes" or a path
    vocab_size: int  # ids are in [0, vocab_size)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids) -> str: ...


class Bytes:
    """UTF-8 bytes as ids (vocabulary 256)."""

    name, vocab_size = "bytes", BYTE_VOCAB_SIZE

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), np.uint8) for text in texts]

    def decode(self, ids) -> str:
        return ids_to_text(ids)


class HFTokenizer:
    """A ``tokenizer.json`` read by the ``tokenizers`` package."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tokenizer = RustTokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises a bare Exception
            raise DataError(f"the tokenizer {str(path)!r} is not a readable tokenizer.json ({error})") from None
        self.name, self.vocab_size = str(path), self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.uint32) for e in encodings]

    def decode(self, ids) -> str:
        return self._tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


class SentencePiece:
    """A sentencepiece ``.model``."""

    def __init__(self, path: Path):
        try:
            import sentencepiece
        except ImportError:
            raise DataError(f"reading the sentencepiece model {str(path)!r} needs sentencepiece: pip install 'lite_tp_jax[data]'") from None

        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise DataError(f"the tokenizer {str(path)!r} is not a readable sentencepiece model ({error})") from None
        self.name, self.vocab_size = str(path), self._processor.GetPieceSize()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        ids = self._processor.Encode(texts, num_threads=os.cpu_count() or 1)
        return [np.asarray(i, np.uint32) for i in ids]

    def decode(self, ids) -> str:
        return self._processor.Decode(np.asarray(ids).tolist())


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """``"bytes"``, a tokenizer.json, a sentencepiece .model, or a directory with one."""
    if str(spec) == "bytes":
        return Bytes()
    path = Path(spec)
    if path.is_dir():
        for name, kind in ((TOKENIZER_JSON, HFTokenizer), (SENTENCEPIECE_MODEL, SentencePiece)):
            if (path / name).is_file():
                return kind(path / name)
        raise DataError(f"the directory {str(path)!r} has no {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL}")
    if not path.is_file():
        raise DataError(
            f"the tokenizer {str(spec)!r} does not exist (expected 'bytes', a tokenizer.json, "
            f"a sentencepiece .model, or a model directory holding one)"
        )
    return SentencePiece(path) if path.suffix == ".model" else HFTokenizer(path)
