"""The README, read top to bottom: its Python snippets and its ``lite-tp``
commands run in order, in one temporary directory, and all succeed.

What stands for what a reader supplies: ``path/to/...`` model directories are
the tiny config's model saved as a Hugging Face Llama (byte vocabulary, so the
README's fine-tuning on text fits it), ``my_texts/`` a folder holding one text file,
``docs.jsonl`` and ``sft.jsonl`` the README's paragraphs, ``path/to/model_dir`` a
directory holding a 200-id BPE ``tokenizer.json`` trained on them. Sizes are made small where a flag allows:
``train.steps=2``, ``--max-new-tokens 4``, ``--steps 2`` for bench, ``--devices 8``
for plan. ``make demo`` and ``make test`` are what CI itself runs, so they are
left out (``make test`` would run this test again).

The commands run in this process (``cli.main``), sharing its 8 fake devices and
its compilations; the snippets run in a fresh interpreter, as a reader's would,
since they choose the number of fake devices before jax starts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lite_tp_jax.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "train": ["--set", "train.steps=2", "checkpoint.every=2", "train.warmup_steps=1"],
    "bench": ["--steps", "2"],
}


def blocks(language: str) -> list[str]:
    """The README's fenced blocks of ``language``, in order."""
    text = (REPO / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def commands() -> list[list[str]]:
    """Every ``lite-tp`` command line of the README's bash blocks, in order, as argv
    (comments dropped), with a reader's paths and small sizes filled in."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():  # continued lines joined
            words = shlex.split(line, comments=True)
            if words[:1] == ["lite-tp"]:
                out.append(small(words[1:]))
    return out


def small(argv: list[str]) -> list[str]:
    argv = [word.replace("path/to/model_dir", "tokenizer-dir").replace("path/to/model", "hf-model") for word in argv]
    if "--max-new-tokens" in argv:
        argv[argv.index("--max-new-tokens") + 1] = "4"
    if argv[0] == "plan" and "--devices" in argv:
        argv[argv.index("--devices") + 1] = "8"
    worker = argv[argv.index("--") + 1] if "--" in argv else argv[0]
    return argv + SMALL.get(worker, [])


def test_the_readme_commands_are_found():
    found = commands()
    assert len(found) >= 12 and {argv[0] for argv in found} >= {"train", "generate", "launch", "convert", "plan", "bench"}
    assert len(blocks("python")) >= 2


@pytest.fixture
def reader_dir(tmp_path, monkeypatch):
    """A fresh directory with what a reader of the README has: the configs, a
    Hugging Face model, a folder of text."""
    from lite_tp_jax import save_pretrained
    from lite_tp_jax.core.mesh import make_mesh_for
    from lite_tp_jax.models.factory import create_model
    from lite_tp_jax.run.config_file import load_config

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    tiny = load_config(REPO / "configs" / "tiny.yaml").model
    save_pretrained(create_model(tiny, make_mesh_for({"tensor": 1})), tmp_path / "hf-model")
    text = (REPO / "README.md").read_text()
    (tmp_path / "my_texts").mkdir()
    (tmp_path / "my_texts" / "notes.txt").write_text(text)
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs)
    with open(tmp_path / "sft.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": a, "completion": b}) + "\n" for a, b in zip(paragraphs, paragraphs[1:]))
    (tmp_path / "tokenizer-dir").mkdir()  # a tokenizer.json whose vocabulary fits the tiny model's 256
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(paragraphs, trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    tokenizer.save(str(tmp_path / "tokenizer-dir" / "tokenizer.json"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_top_to_bottom(reader_dir):
    snippets = "\n".join(blocks("python")).replace("path/to/Llama-3.2-1B", str(reader_dir / "hf-model"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    ran = subprocess.run([sys.executable, "-c", snippets], cwd=reader_dir, env=env, capture_output=True, text=True,
                         timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert (reader_dir / "out" / "config.json").exists()  # the snippet's save_pretrained
    for argv in commands():
        assert main(argv) == 0, f"lite-tp {shlex.join(argv)}"
    assert (reader_dir / "out-ft" / "model.safetensors").exists()
    assert (reader_dir / "benchmarks" / "results" / "bench.json").exists()
