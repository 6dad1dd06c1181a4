"""A tokenized corpus on disk: one token file and a document index, read
memory-mapped (``lite-tp tokenize`` writes it, ``data.source: tokenized`` reads it).

A corpus is a directory::

    tokens.bin      every document's ids, concatenated: raw little-endian, the
                    smallest unsigned dtype that holds the vocabulary (uint8 up
                    to 256 ids, uint16 up to 65536, else uint32)
    documents.npy   int64 [documents + 1]: document i is tokens[d[i]:d[i+1]]
    prompts.npy     int64 [documents]: how many leading tokens of each document
                    are an instruction prompt, not trained on (0: plain text)
    corpus.json     dtype, vocab_size, tokenizer, documents, tokens

``TokenizedCorpus`` maps ``tokens.bin`` and the index with ``np.memmap`` /
``mmap_mode="r"``: opening it reads only ``corpus.json``, and a batch reads
only the pages of its rows, so resident memory does not grow with the file.
``CorpusWriter`` streams documents into a directory (``write`` per chunk);
``lite-tp tokenize`` wraps it in ``runtime.run_dir.atomic_directory``.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np

from lite_tp_jax.run.tokens import DataError

FORMAT = "lite_tp_jax.tokenized/1"
TOKENS, DOCUMENTS, PROMPTS, META = "tokens.bin", "documents.npy", "prompts.npy", "corpus.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids ``0 .. vocab_size - 1``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise DataError(f"a vocabulary of {vocab_size} ids does not fit in uint32")


class CorpusWriter:
    """Appends documents (arrays of ids) to ``tokens.bin`` of ``directory``;
    ``close`` writes the index and ``corpus.json``."""

    def __init__(self, directory: str | os.PathLike, vocab_size: int, tokenizer: str):
        self.directory, self.vocab_size, self.tokenizer = Path(directory), int(vocab_size), tokenizer
        self.dtype = token_dtype(self.vocab_size)
        self._file = open(self.directory / TOKENS, "wb")
        self._ends: list[int] = [0]
        self._prompts: list[int] = []

    def write(self, documents: list[np.ndarray], prompts: list[int] | None = None) -> None:
        """Appends ``documents``; ``prompts[i]``: leading prompt tokens of document i."""
        for ids in documents:
            ids = np.asarray(ids)
            if ids.size and int(ids.max()) >= self.vocab_size:
                raise DataError(f"the tokenizer made id {int(ids.max())}, outside its vocabulary of {self.vocab_size}")
            self._file.write(ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            self._ends.append(self._ends[-1] + ids.size)
        self._prompts += prompts if prompts is not None else [0] * len(documents)

    @property
    def tokens(self) -> int:
        return self._ends[-1]

    def close(self) -> dict:
        """Writes the index; returns the metadata written to corpus.json."""
        self._file.close()
        np.save(self.directory / DOCUMENTS, np.asarray(self._ends, np.int64))
        np.save(self.directory / PROMPTS, np.asarray(self._prompts, np.int64))
        meta = {
            "format": FORMAT, "dtype": self.dtype.name, "vocab_size": self.vocab_size, "tokenizer": self.tokenizer,
            "documents": len(self._ends) - 1, "tokens": self.tokens,
        }
        (self.directory / META).write_text(json.dumps(meta, indent=1) + "\n")
        return meta


class TokenizedCorpus:
    """A corpus directory, memory-mapped: ``tokens`` (1-D, its stored dtype),
    ``ends`` (``documents.npy``) and ``prompts``; ``document(i)`` is one document."""

    def __init__(self, path: str | os.PathLike, vocab_size: int | None = None):
        self.path = Path(path)
        where = repr(str(self.path))
        if not (self.path / META).is_file():
            what = "does not exist" if not self.path.exists() else f"is not a tokenized corpus (no {META})"
            raise DataError(f"the corpus {where} {what}; make one with lite-tp tokenize")
        try:
            meta = json.loads((self.path / META).read_text())
            self.dtype, self.vocab_size = np.dtype(meta["dtype"]), int(meta["vocab_size"])
            self.tokenizer, self.num_tokens = str(meta["tokenizer"]), int(meta["tokens"])
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"the corpus {where} has a damaged {META} ({error!r}); tokenize it again") from None
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise DataError(
                f"the corpus {where} was tokenized with a vocabulary of {self.vocab_size} ids "
                f"({self.tokenizer}) but model.vocab_size is {vocab_size}; use the model's own tokenizer "
                f"or set model.vocab_size >= {self.vocab_size}"
            )
        size = (self.path / TOKENS).stat().st_size if (self.path / TOKENS).is_file() else -1
        if size != self.num_tokens * self.dtype.itemsize:
            raise DataError(
                f"the corpus {where} has a {TOKENS} of {size} bytes, not the {self.num_tokens} x "
                f"{self.dtype.itemsize} its {META} says; tokenize it again"
            )
        if self.num_tokens == 0:
            raise DataError(f"the corpus {where} holds no tokens")
        self.tokens = np.memmap(self.path / TOKENS, dtype=self.dtype.newbyteorder("<"), mode="r")
        # rows are read at random: no read-ahead or fault-around of the pages next to them
        self.tokens._mmap.madvise(mmap.MADV_RANDOM)
        self.ends = np.load(self.path / DOCUMENTS, mmap_mode="r")
        self.prompts = np.load(self.path / PROMPTS, mmap_mode="r")
        if self.ends[-1] != self.num_tokens or self.prompts.size != self.ends.size - 1:
            raise DataError(f"the corpus {where} has an index that does not match its {TOKENS}; tokenize it again")

    @property
    def num_documents(self) -> int:
        return self.ends.size - 1

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.ends[i] : self.ends[i + 1]])

    def has_prompts(self) -> bool:
        return bool(self.prompts.size) and bool(np.any(self.prompts))

    def __repr__(self) -> str:
        return f"TokenizedCorpus({str(self.path)!r}, {self.num_documents} documents, {self.num_tokens} {self.dtype.name} tokens)"
