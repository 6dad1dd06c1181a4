"""Collective accounting read from compiled HLO text.

``collectives(jax.jit(f).lower(*args).compile().as_text())`` lists every
collective XLA will run, with its kind and the elements and bytes of its
result, so tests can assert exactly the communication the math needs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
}
_INSTRUCTION = re.compile(
    r"=\s*(?P<type>\([^=]*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")


@dataclass(frozen=True)
class Collective:
    """One array moved by a collective. XLA's combiner may fuse several
    independent all-reduces into one tuple-shaped instruction; each operand is
    listed on its own, so counts do not depend on that optimisation."""

    kind: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        return self.elements * _DTYPE_BYTES[self.dtype]


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective in ``hlo_text``, one entry per array (async pairs once)."""
    found = []
    hlo_text = _COMMENT.sub("", hlo_text)  # tuple types of 6+ arrays carry /*index=5*/ comments
    for match in _INSTRUCTION.finditer(hlo_text):
        kind, arrays = match.group("kind"), _ARRAY.findall(match.group("type"))
        shapes = [tuple(int(d) for d in dims.split(",") if d) for _, dims in arrays]
        if match.group("start") and kind != "all-reduce":  # async tuple: (operand, result[, scratch])
            found.append(Collective(kind, shapes[min(1, len(shapes) - 1)], arrays[0][0]))
        elif kind == "all-to-all" and len(shapes) > 1:  # one all-to-all, one operand per rank
            found.append(Collective(kind, (len(shapes), *shapes[0]), arrays[0][0]))
        else:  # one array, or several all-reduces that XLA combined
            found.extend(Collective(kind, shape, dtype) for shape, (dtype, _) in zip(shapes, arrays))
    return found


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", re.MULTILINE)
_WHILE = re.compile(r"body=%([\w.\-]+).*\"known_trip_count\":\{\"n\":\"(\d+)\"")


def collectives_per_step(hlo_text: str) -> list[tuple[Collective, int]]:
    """Every collective with the number of times one run of the program runs
    it: a collective in a while loop's body (a layer scan, a pipeline's tick
    loop) counts once per iteration, by the loops' known trip counts."""
    starts = list(_COMPUTATION.finditer(hlo_text))
    ends = [m.start() for m in starts[1:]] + [len(hlo_text)]
    bodies = {m.group(1): hlo_text[m.start():end] for m, end in zip(starts, ends)}
    loops = {body: (name, int(n)) for name, text in bodies.items() for body, n in _WHILE.findall(text)}

    def runs(name: str) -> int:
        parent, n = loops.get(name, (None, 1))
        return n * (runs(parent) if parent else 1)

    return [(c, runs(name)) for name, text in bodies.items() for c in collectives(text)]


def summary(hlo_text: str) -> dict[str, list[int]]:
    """``{kind: [elements of each array]}``, for readable assertion messages."""
    out: dict[str, list[int]] = {}
    for c in collectives(hlo_text):
        out.setdefault(c.kind, []).append(c.elements)
    return out
