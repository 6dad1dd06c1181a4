"""Text in and out of token ids: a Hugging Face ``tokenizer.json`` (or the
byte-level ids of ``lite-tp train``, ``run/tokens.py``), and streaming the text
of each new token as it is generated."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from lite_tp_jax.core.errors import BadInput
from lite_tp_jax.inference.generator import Generator
from lite_tp_jax.inference.sampling import Sampling
from lite_tp_jax.models.transformer import Transformer
from lite_tp_jax.run.tokens import ByteTokenizer


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # noqa: BLE001 - the tokenizers package raises a bare Exception
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BadInput(f"{path} is not a tokenizer the tokenizers package can read ({reason}); "
                           f"give the model's own tokenizer.json.") from None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def load_tokenizer(model_dir: str | os.PathLike, vocab_size: int):
    """The model directory's ``tokenizer.json`` through the ``tokenizers`` package,
    or byte-level when it has none (only for vocabularies of at most 256)."""
    path = Path(model_dir) / "tokenizer.json"
    if path.exists():
        try:
            return HFTokenizer(path)
        except ImportError:
            reason = f"{path} needs the tokenizers package (pip install tokenizers)"
    else:
        reason = f"{model_dir} has no tokenizer.json"
    if vocab_size > 256:
        raise BadInput(f"{reason}, and its vocabulary of {vocab_size} is not byte-level tokens.")
    return ByteTokenizer()


class TextStream:
    """The text each new token adds; held back while it ends in an incomplete
    character (a multi-byte UTF-8 sequence cut short decodes to U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new


def stream_text(
    model: Transformer, prompt: str, *, max_new_tokens: int, sampling: Sampling = Sampling(),
    seed: int = 0, tokenizer=None,
) -> Iterator[str]:
    """The text of each new token of ``prompt``'s continuation, as it is produced."""
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    ids = tokenizer.encode(prompt) or tokenizer.encode("\n")
    text = TextStream(tokenizer)
    for tokens in Generator(model, sampling).stream([ids], max_new_tokens, seed=seed):
        piece = text.push(tokens[0])
        if piece:
            yield piece
    rest = text.flush()
    if rest:
        yield rest


def generate(model: Transformer, prompt: str, *, max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0, tokenizer=None) -> str:
    """``prompt`` followed by its continuation of ``max_new_tokens`` tokens."""
    pieces = stream_text(model, prompt, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, tokenizer=tokenizer)
    return prompt + "".join(pieces)
