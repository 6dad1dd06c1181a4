"""Reading safetensors files: the header, then a memory map per tensor read.

``Checkpoint(directory)`` reads the headers of a Hugging Face model
directory's ``*.safetensors`` files (the ones ``model.safetensors.index.json``
names, or all of them) and ``read(name, index)`` returns a copy of one
tensor's block ``tensor[index]`` through a memory map of its file: only the
file pages the block covers are touched, and the map is dropped after each
read.

Why a memory map rather than ``safetensors.safe_open``: its numpy backend
cannot represent bfloat16, the dtype of most published checkpoints
(``ml_dtypes`` can). Pickled ``pytorch_model.bin`` files are not read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from lite_tp_jax.interop.errors import HFError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # of the tensor's first byte in the file


def _read_header(file: Path) -> dict[str, _Entry]:
    size = file.stat().st_size
    with file.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 2 <= length <= size - 8:
            raise HFError(f"{file} is not a safetensors file (header length {length}, file size {size}).")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            raise HFError(f"{file} is not a safetensors file (its header is not JSON).") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise HFError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which this reader does not know.")
        begin, end = info["data_offsets"]
        entry = _Entry(file, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin)
        if end - begin != math.prod(entry.shape) * entry.dtype.itemsize or entry.offset + end - begin > size:
            raise HFError(f"{file}: tensor {name!r} has data offsets {info['data_offsets']} that do not fit its shape or the file.")
        entries[name] = entry
    return entries


class Checkpoint:
    """The tensors of a Hugging Face model directory, by name, read in blocks."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError, TypeError):
                raise HFError(f"{index} is not a safetensors index (a JSON object with a weight_map).") from None
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise HFError(f"{self.directory} holds no *.safetensors files (pytorch_model.bin is not read: no pickle).")
        self.entries: dict[str, _Entry] = {}
        for name in files:
            if not (self.directory / name).exists():
                raise HFError(f"{index} names {name}, which is not in {self.directory}.")
            self.entries.update(_read_header(self.directory / name))

    def shape(self, name: str) -> tuple[int, ...] | None:
        entry = self.entries.get(name)
        return None if entry is None else entry.shape

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """A copy of ``tensor[index]``; only the file pages it covers are touched."""
        entry = self.entries[name]
        mapped = np.memmap(entry.file, entry.dtype, mode="r", offset=entry.offset, shape=entry.shape)
        block = np.array(mapped[index])
        del mapped
        return block
