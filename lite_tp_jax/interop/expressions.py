"""Where a parameter is in a checkpoint: small array expressions over HF tensors.

An HF tensor (``Tensor``), transposed (``Transpose``: PyTorch ``nn.Linear``
stores ``[out, in]``, Flax ``[in, out]``), a dim split in two (``Split``:
``[heads * head_dim]`` -> ``[heads, head_dim]``), a window of a fused tensor
(``Window``: GPT-2's ``c_attn`` holds q, k and v side by side), and a stack of
per-layer or per-expert tensors (``Stack``). Reading a block of an expression
reads only the matching block of the file; writing runs the same expressions
backwards, into whole HF tensors held in memory (``save_pretrained``).

Why not orbax's v1 safetensors layout (``CheckpointLayout.SAFETENSORS``): it
restores each checkpoint tensor under its own name and shape into a target
sharding, while here a parameter is a transposed, reshaped, padded stack of
several checkpoint tensors (layers, experts, GPT-2's fused q/k/v).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lite_tp_jax.interop.safetensors_files import Checkpoint

Index = tuple[slice, ...]


class Node:
    """An array expression over checkpoint tensors. ``read(checkpoint, index)``
    returns ``self[index]`` reading no more than it needs; ``write(value, out,
    index)`` stores ``value`` as ``self[index]`` into the HF buffers ``out``."""

    shape: tuple[int, ...]

    def leaves(self) -> list[Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class Tensor(Node):
    name: str
    shape: tuple[int, ...]

    def leaves(self):
        return [self]

    def read(self, checkpoint: Checkpoint, index: Index) -> np.ndarray:
        return checkpoint.read(self.name, index)

    def write(self, value: np.ndarray, out: dict[str, np.ndarray], index: Index) -> None:
        out[self.name][index] = value


@dataclass(frozen=True)
class Transpose(Node):
    """``base.transpose(perm)``."""

    base: Node
    perm: tuple[int, ...]

    @property
    def shape(self):
        return tuple(self.base.shape[p] for p in self.perm)

    def leaves(self):
        return self.base.leaves()

    def _base_index(self, index: Index) -> Index:
        base = [slice(None)] * len(self.perm)
        for i, p in enumerate(self.perm):
            base[p] = index[i]
        return tuple(base)

    def read(self, checkpoint, index):
        return self.base.read(checkpoint, self._base_index(index)).transpose(self.perm)

    def write(self, value, out, index):
        self.base.write(value.transpose(np.argsort(self.perm)), out, self._base_index(index))


@dataclass(frozen=True)
class Split(Node):
    """``base`` with dim ``dim`` (of size ``a * b``) split into ``(a, b)``."""

    base: Node
    dim: int
    sizes: tuple[int, int]

    @property
    def shape(self):
        shape = self.base.shape
        return (*shape[: self.dim], *self.sizes, *shape[self.dim + 1 :])

    def leaves(self):
        return self.base.leaves()

    def read(self, checkpoint, index):
        outer, inner = index[self.dim], index[self.dim + 1]
        b = self.sizes[1]
        rows = slice(outer.start * b, outer.stop * b)
        block = self.base.read(checkpoint, (*index[: self.dim], rows, *index[self.dim + 2 :]))
        block = block.reshape(*block.shape[: self.dim], outer.stop - outer.start, b, *block.shape[self.dim + 1 :])
        return block[(slice(None),) * (self.dim + 1) + (inner,)]

    def write(self, value, out, index):
        outer, inner = index[self.dim], index[self.dim + 1]
        if (inner.start, inner.stop) != (0, self.sizes[1]):
            raise NotImplementedError("Split.write needs whole inner rows")
        b = self.sizes[1]
        merged = value.reshape(*value.shape[: self.dim], -1, *value.shape[self.dim + 2 :])
        self.base.write(merged, out, (*index[: self.dim], slice(outer.start * b, outer.stop * b), *index[self.dim + 2 :]))


@dataclass(frozen=True)
class Window(Node):
    """``base[..., start:stop, ...]`` along ``dim``."""

    base: Node
    dim: int
    start: int
    stop: int

    @property
    def shape(self):
        shape = list(self.base.shape)
        shape[self.dim] = self.stop - self.start
        return tuple(shape)

    def leaves(self):
        return self.base.leaves()

    def _base_index(self, index):
        s = index[self.dim]
        return (*index[: self.dim], slice(s.start + self.start, s.stop + self.start), *index[self.dim + 1 :])

    def read(self, checkpoint, index):
        return self.base.read(checkpoint, self._base_index(index))

    def write(self, value, out, index):
        self.base.write(value, out, self._base_index(index))


@dataclass(frozen=True)
class Stack(Node):
    """``stack(items)`` along a new leading dim (layers, experts)."""

    items: tuple[Node, ...]

    @property
    def shape(self):
        return (len(self.items), *self.items[0].shape)

    def leaves(self):
        return [leaf for item in self.items for leaf in item.leaves()]

    def read(self, checkpoint, index):
        first, rest = index[0], index[1:]
        return np.stack([self.items[i].read(checkpoint, rest) for i in range(first.start, first.stop)])

    def write(self, value, out, index):
        first, rest = index[0], index[1:]
        for k, i in enumerate(range(first.start, first.stop)):
            self.items[i].write(value[k], out, rest)


def full_index(shape: Sequence[int]) -> Index:
    """The index of the whole of an array of ``shape``."""
    return tuple(slice(0, n) for n in shape)
