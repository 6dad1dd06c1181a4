"""Collective accounting read from compiled HLO text.

``collectives(jax.jit(f).lower(*args).compile().as_text())`` lists every
collective XLA will run, with its kind and the elements and bytes of its
result, so tests can assert exactly the communication the math needs.

Given the mesh the program was compiled for, each collective also names the
mesh axes it spans, read from its device groups (``replica_groups``, or a
collective-permute's ``source_target_pairs``). Device ids in the groups are
positions in ``mesh.devices.flat`` (partition ids); XLA prints groups in three
forms, all understood here::

    {{0,1},{2,3}}                              explicit lists
    [4,2]<=[2,4]T(1,0)                         iota: arange(8).reshape(2,4).T, in rows of 2
    mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}
                                               the devices that differ only along axis_0

``bytes_by_axis(hlo_text, mesh)`` sums result bytes per device per step by
those axes: the measure the planner predicts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
}
_INSTRUCTION = re.compile(
    r"=\s*(?P<type>\([^=]*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\((?P<rest>[^\n]*)"
)
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")

_EXPLICIT = re.compile(r"(?:replica_groups|source_target_pairs)=\{((?:\{[\d,]*\},?)*)\}")
_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH = re.compile(
    r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}"
)


@dataclass(frozen=True)
class Collective:
    """One array moved by a collective. XLA's combiner may fuse several
    independent all-reduces into one tuple-shaped instruction; each operand is
    listed on its own, so counts do not depend on that optimisation.

    ``groups``: the device groups (partition ids) it runs over, as printed
    (for a collective-permute, its (source, target) pairs); ``()`` when the
    text gives none (every device). ``axes``: the mesh axes the groups span,
    filled in when ``collectives`` is given the mesh."""

    kind: str
    shape: tuple[int, ...]
    dtype: str
    groups: tuple[tuple[int, ...], ...] = ()
    axes: tuple[str, ...] | None = None

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        return self.elements * _DTYPE_BYTES[self.dtype]


def _iota(dims: str, perm: str | None) -> np.ndarray:
    """XLA's iota tile ``[dims]T(perm)``: arange reshaped to dims, transposed by perm."""
    shape = [int(d) for d in dims.split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    return ids.transpose([int(p) for p in perm.split(",")]) if perm else ids


def device_groups(attributes: str) -> tuple[tuple[int, ...], ...]:
    """The device groups of one instruction, from the text after its operands."""
    if match := _EXPLICIT.search(attributes):
        return tuple(tuple(int(i) for i in g.split(",") if i) for g in re.findall(r"\{([\d,]*)\}", match.group(1)))
    if match := _IOTA.search(attributes):
        rows = [int(d) for d in match.group(1).split(",")]
        return tuple(map(tuple, _iota(match.group(2), match.group(3)).reshape(rows[0], -1).tolist()))
    if match := _MESH.search(attributes):
        names_sizes = [entry.split("=") for entry in match.group(1).split(",")]
        names = [name.strip().strip("'") for name, _ in names_sizes]
        sizes = [int(size) for _, size in names_sizes]
        ids = (_iota(match.group(2), match.group(3)) if match.group(2) else np.arange(math.prod(sizes))).reshape(sizes)
        grouped = [names.index(name.strip().strip("'")) for name in match.group(4).split(",") if name.strip()]
        others = [i for i in range(len(sizes)) if i not in grouped]
        size = math.prod(sizes[i] for i in grouped)
        return tuple(map(tuple, ids.transpose(others + grouped).reshape(-1, size).tolist()))
    return ()


def mesh_axes(groups: tuple[tuple[int, ...], ...], mesh) -> tuple[str, ...]:
    """The axes of ``mesh`` along which the devices of some group differ, in mesh order.

    Device id ``i`` is the i-th device of ``mesh.devices.flat``; no groups means every device."""
    shape = tuple(mesh.devices.shape)
    if not groups:
        return tuple(name for name, size in zip(mesh.axis_names, shape) if size > 1)
    spanned = set()
    for group in groups:
        coords = np.array(np.unravel_index(np.asarray(group), shape))  # [axes, members]
        spanned.update(i for i in range(len(shape)) if len(set(coords[i].tolist())) > 1)
    return tuple(name for i, name in enumerate(mesh.axis_names) if i in spanned)


def collectives(hlo_text: str, mesh=None) -> list[Collective]:
    """Every collective in ``hlo_text``, one entry per array (async pairs once);
    with ``mesh``, each names the mesh axes it spans."""
    found = []
    hlo_text = _COMMENT.sub("", hlo_text)  # tuple types of 6+ arrays carry /*index=5*/ comments
    for match in _INSTRUCTION.finditer(hlo_text):
        kind, arrays = match.group("kind"), _ARRAY.findall(match.group("type"))
        shapes = [tuple(int(d) for d in dims.split(",") if d) for _, dims in arrays]
        groups = device_groups(match.group("rest"))
        where = dict(groups=groups, axes=None if mesh is None else mesh_axes(groups, mesh))
        if match.group("start") and kind != "all-reduce":  # async tuple: (operand, result[, scratch])
            found.append(Collective(kind, shapes[min(1, len(shapes) - 1)], arrays[0][0], **where))
        elif kind == "all-to-all" and len(shapes) > 1:  # one all-to-all, one operand per rank
            found.append(Collective(kind, (len(shapes), *shapes[0]), arrays[0][0], **where))
        else:  # one array, or several all-reduces that XLA combined
            found.extend(Collective(kind, shape, dtype, **where) for shape, (dtype, _) in zip(shapes, arrays))
    return found


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", re.MULTILINE)
_WHILE = re.compile(r"body=%([\w.\-]+).*\"known_trip_count\":\{\"n\":\"(\d+)\"")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}|(?:true|false)_computation=%([\w.\-]+)")


def collectives_per_step(hlo_text: str, mesh=None) -> list[tuple[Collective, int]]:
    """Every collective with the number of times one run of the program runs
    it: a collective in a while loop's body (a layer scan, a pipeline's tick
    loop) counts once per iteration, by the loops' known trip counts; one in a
    conditional's branch as often as the computation holding the conditional
    (``jax.lax.platform_dependent`` leaves one-branch conditionals)."""
    starts = list(_COMPUTATION.finditer(hlo_text))
    ends = [m.start() for m in starts[1:]] + [len(hlo_text)]
    bodies = {m.group(1): hlo_text[m.start():end] for m, end in zip(starts, ends)}
    loops = {body: (name, int(n)) for name, text in bodies.items() for body, n in _WHILE.findall(text)}
    for name, text in bodies.items():  # a conditional's branches run (at most) as often as their caller
        for listed, single in _BRANCHES.findall(text):
            for branch in [b.strip().lstrip("%") for b in listed.split(",")] if listed else [single]:
                loops.setdefault(branch, (name, 1))

    def runs(name: str) -> int:
        parent, n = loops.get(name, (None, 1))
        return n * (runs(parent) if parent else 1)

    return [(c, runs(name)) for name, text in bodies.items() for c in collectives(text, mesh)]


def axes_label(axes: tuple[str, ...]) -> str:
    """``("data", "tensor")`` -> ``"data+tensor"``; no axes -> ``"none"``."""
    return "+".join(axes) or "none"


def bytes_by_axis(hlo_text: str, mesh) -> dict[str, int]:
    """Result bytes per device in one run of the program, by the mesh axes each
    collective spans (``axes_label``), loop trip counts applied."""
    out: dict[str, int] = {}
    for c, runs in collectives_per_step(hlo_text, mesh):
        out[axes_label(c.axes)] = out.get(axes_label(c.axes), 0) + c.bytes * runs
    return dict(sorted(out.items()))


def summary(hlo_text: str) -> dict[str, list[int]]:
    """``{kind: [elements of each array]}``, for readable assertion messages."""
    out: dict[str, list[int]] = {}
    for c in collectives(hlo_text):
        out.setdefault(c.kind, []).append(c.elements)
    return out
