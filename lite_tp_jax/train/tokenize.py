"""``lite-tp tokenize``: text files, JSONL or a Hugging Face dataset saved to
disk -> a tokenized corpus (``corpus.py``), streamed, on every core, with a
progress bar, written atomically.

Inputs (``source``):

* a text file, a directory (recursive *.txt, *.md, *.py) or a glob: one
  document per file;
* a ``.jsonl`` file: one document per line, the string field ``field``
  (default "text"); or, with ``prompt_field`` and ``completion_field``,
  instruction data: prompt then completion, the prompt's tokens not trained on;
* a directory written by ``datasets.Dataset.save_to_disk`` (a
  ``DatasetDict``'s ``split``), the same fields.

Documents are read and tokenized in chunks of about ``chunk_bytes`` of text
(``Tokenizer.encode_batch`` uses every core), appended to the token file and
forgotten, so memory does not grow with the corpus. The output appears only
when complete (``runtime.run_dir.atomic_directory``): an error or Ctrl-C
leaves nothing behind. Prompt and completion are tokenized separately and
concatenated, so the boundary between them is exact.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

import numpy as np

from lite_tp_jax.run.tokenizer import Tokenizer
from lite_tp_jax.run.tokens import DataError
from lite_tp_jax.runtime.run_dir import atomic_directory
from lite_tp_jax.train.corpus import CorpusWriter
from lite_tp_jax.train.data import text_files

HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Fields:
    """Which JSON / dataset fields hold a document: ``text``, or ``prompt`` and ``completion``."""

    text: str = "text"
    prompt: str | None = None
    completion: str | None = None

    def __post_init__(self):
        if (self.prompt is None) != (self.completion is None):
            raise DataError("instruction data needs both --prompt-field and --completion-field, or neither")

    @property
    def instruction(self) -> bool:
        return self.prompt is not None

    def read(self, record, where: str) -> tuple[str, str]:
        """``(prompt, text)`` of one record (prompt "" for plain text)."""
        names = (self.prompt, self.completion) if self.instruction else (self.text,)
        if not isinstance(record, dict):
            raise DataError(f"{where} is not a JSON object")
        for name in names:
            if name not in record:
                raise DataError(f"{where} has no field {name!r} (fields: {', '.join(map(repr, record)) or 'none'})")
            if not isinstance(record[name], str):
                raise DataError(f"{where} field {name!r} is a {type(record[name]).__name__}, not a string")
        return (record[self.prompt], record[self.completion]) if self.instruction else ("", record[self.text])


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in HF_DATASET_MARKERS)


def _records(source: str, fields: Fields, split: str) -> tuple[Iterator[tuple[str, str, int]], int]:
    """Documents as ``(prompt, text, bytes read)``, and the total bytes (for the progress bar)."""
    path = Path(source)
    if is_hf_dataset(path):
        return _hf_records(path, fields, split)
    files = text_files(source)
    if all(f.suffix == ".jsonl" for f in files):
        return _jsonl_records(files, fields), sum(f.stat().st_size for f in files)
    if fields.instruction:
        raise DataError(f"--prompt-field needs JSONL or a dataset; {source!r} is text files")
    return _text_records(files), sum(f.stat().st_size for f in files)


def _text_records(files: list[Path]) -> Iterator[tuple[str, str, int]]:
    for file in files:
        data = file.read_bytes()
        if data:
            yield "", data.decode("utf-8", errors="replace"), len(data)


def _jsonl_records(files: list[Path], fields: Fields) -> Iterator[tuple[str, str, int]]:
    for file in files:
        with open(file, "rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{file}:{number}"
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise DataError(f"{where} is not valid JSON ({error})") from None
                yield (*fields.read(record, where), len(line))


def _hf_records(path: Path, fields: Fields, split: str) -> tuple[Iterator[tuple[str, str, int]], int]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the saved dataset {str(path)!r} needs datasets: pip install 'lite_tp_jax[data]'") from None

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"the dataset {str(path)!r} has no split {split!r}; it has {', '.join(dataset)}")
        dataset = dataset[split]
    rows = len(dataset)

    def records():
        for i, record in enumerate(dataset.iter(batch_size=1000)):
            batch = [dict(zip(record, values)) for values in zip(*record.values())]
            for j, row in enumerate(batch):
                yield (*fields.read(row, f"{path} row {i * 1000 + j}"), 1)

    return records(), rows


def tokenize(
    source: str, out: str | os.PathLike, tokenizer: Tokenizer, *, fields: Fields = Fields(), split: str = "train",
    chunk_bytes: int = 1 << 20, show_progress: bool = True,
) -> dict:
    """Tokenizes ``source`` into the corpus directory ``out`` (which must not
    exist); returns its metadata plus ``seconds`` and ``bytes`` read."""
    out = Path(out)
    if out.exists():
        raise DataError(f"the output {str(out)!r} already exists; remove it or choose another path")
    records, total = _records(source, fields, split)
    unit = "rows" if is_hf_dataset(Path(source)) else "bytes"
    columns = [TextColumn("tokenize"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [TextColumn("{task.completed}/{task.total} rows")]
    started, read = time.perf_counter(), 0
    with Progress(*columns, TimeRemainingColumn(), disable=not show_progress) as progress, atomic_directory(out) as tmp:
        task = progress.add_task("tokenize", total=total)
        writer = CorpusWriter(tmp, tokenizer.vocab_size, tokenizer.name)
        chunk: list[tuple[str, str]] = []
        size = 0
        for prompt, text, nbytes in records:
            chunk.append((prompt, text))
            size += len(text) + len(prompt)
            read += nbytes
            if size >= chunk_bytes:
                _write_chunk(writer, tokenizer, chunk, fields.instruction)
                progress.update(task, completed=read)
                chunk, size = [], 0
        if chunk:
            _write_chunk(writer, tokenizer, chunk, fields.instruction)
        if writer.tokens == 0:
            raise DataError(f"{source!r} holds no text to tokenize (empty files or fields)")
        progress.update(task, completed=read)
        meta = writer.close()
    return {**meta, "seconds": time.perf_counter() - started, "bytes": read if unit == "bytes" else None}


def _write_chunk(writer: CorpusWriter, tokenizer: Tokenizer, chunk: list[tuple[str, str]], instruction: bool) -> None:
    texts = tokenizer.encode_batch([text for _, text in chunk])
    if not instruction:
        writer.write(texts)
        return
    prompts = tokenizer.encode_batch([prompt for prompt, _ in chunk])
    writer.write([np.concatenate([p, t]) for p, t in zip(prompts, texts)], [p.size for p in prompts])
