"""Tokenize throughput and packing efficiency on the standard-library corpus.

    PYTHONPATH=. python benchmarks/tokenize_and_pack.py [--out benchmarks/results/tokenize_and_pack.md]

No tokenizer.json is on this machine (and none can be downloaded), so a
byte-level BPE of 8192 ids is trained here on the corpus with the
``tokenizers`` package (its training time is reported apart). Then the same
files (the ``data.source: stdlib`` corpus: the standard library's .py files,
no tests, the first 4 MB) are tokenized by ``lite_tp_jax.train.tokenize``
with bytes and with that BPE, side by side (MB of input text per second,
best of three), and packed into rows of several lengths by
``train/packing.PackedRows``: the efficiency is the fraction of row slots
that hold a document token, against the plain stream (every slot a token,
but documents attend across boundaries).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from lite_tp_jax.run.tokenizer import load_tokenizer
from lite_tp_jax.train.corpus import TokenizedCorpus
from lite_tp_jax.train.data import stdlib_files
from lite_tp_jax.train.packing import Documents, PackedRows
from lite_tp_jax.train.tokenize import tokenize


def corpus_files(max_bytes: int = 4_000_000) -> list[Path]:
    files, size = [], 0
    for file in stdlib_files():
        if size >= max_bytes:
            break
        files.append(file)
        size += file.stat().st_size + 1
    return files


def train_bpe(files: list[Path], path: Path, vocab_size: int = 8192) -> float:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    started = time.perf_counter()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train([str(f) for f in files], trainer)
    tokenizer.save(str(path))
    return time.perf_counter() - started


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tokenize_bench."))
    files = corpus_files()
    source = work / "stdlib"
    source.mkdir()
    for i, file in enumerate(files):  # one document per file, in the corpus's order
        os.symlink(file, source / f"{i:05d}.py")
    bpe_seconds = train_bpe(files, work / "tokenizer.json")
    lines = [f"# Tokenize and pack: the stdlib corpus ({len(files)} files, cpus: {os.cpu_count()})", "",
             f"BPE of 8192 ids trained here with `tokenizers` in {bpe_seconds:.1f} s (no tokenizer.json is available offline).",
             "", "| tokenizer | MB/s (best of 3) | tokens | dtype |", "|---|---|---|---|"]
    corpora = {}
    for name, spec in (("bytes", "bytes"), ("bpe-8192", work / "tokenizer.json")):
        best = None
        for attempt in range(3):
            out = work / f"{name}-{attempt}"
            meta = tokenize(str(source), out, load_tokenizer(spec), show_progress=False)
            rate = meta["bytes"] / 1e6 / meta["seconds"]
            best = rate if best is None else max(best, rate)
        corpora[name] = TokenizedCorpus(out)
        lines.append(f"| {name} | {best:.2f} | {meta['tokens']} | {meta['dtype']} |")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    size = sum(len(t.encode()) for t in texts)
    bpe = load_tokenizer(work / "tokenizer.json")
    baseline = min(_timed(lambda: bpe.encode_batch(texts)) for _ in range(3))
    lines.append(f"| bpe-8192, `tokenizers` alone (one encode_batch of every file, nothing written) | {size / 1e6 / baseline:.2f} | | |")
    lines.append(f"\nload average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine).")
    lines += ["", "| tokenizer | seq_len | packed rows | efficiency (non-pad) | stream windows |", "|---|---|---|---|---|"]
    for name, corpus in corpora.items():
        documents = Documents(corpus.tokens, corpus.ends, corpus.prompts)
        for seq_len in (512, 1024, 2048, 4096):
            rows = PackedRows(documents, seq_len)
            lines.append(f"| {name} | {seq_len} | {rows.num_rows} | {rows.efficiency:.4f} | {corpus.num_tokens // (seq_len + 1)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
