"""The mesh axes, declared once: their names, their order, and their sizes.

Order is outermost first, "tensor" innermost, so a tensor-parallel group is
made of neighbouring devices (on real hardware the fastest links) and nests
inside each data-parallel replica. Every module that needs the axes iterates
over ``AXES`` or names one of the constants; a new axis is added here (and in
the rule table, the layers that split over it and the planner's formulas).

No jax here: the config layer and the process supervisor read this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from lite_tp_jax.core.errors import BadInput

DATA, PIPELINE, EXPERT, FSDP, CONTEXT, TENSOR = "data", "pipeline", "expert", "fsdp", "context", "tensor"
AXES: tuple[str, ...] = (DATA, PIPELINE, EXPERT, FSDP, CONTEXT, TENSOR)
"""Every mesh axis, outermost first. "context" (context parallelism: it splits
the sequence of every activation, token and position for the whole model,
``parallel/context.py``) sits just outside "tensor", so a context group is made
of the next-fastest links; "fsdp" comes next, and "data" outside it replicates
its shards (HSDP: sharded within a host, replicated across hosts)."""

BATCH_AXES: tuple[str, ...] = (DATA, EXPERT, FSDP)
"""The axes that split token rows, in mesh order (data parallelism; expert ranks
hold other rows too; fsdp ranks are data-parallel ranks that also split the parameters)."""

SpecEntry = str | tuple[str, ...] | None
"""One entry of a PartitionSpec: no axis, one axis, or several acting as one."""


def entry_axes(entry: SpecEntry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry, as a tuple."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def spec_entry(axes: Iterable[str]) -> SpecEntry:
    """The PartitionSpec entry that splits a dim over ``axes`` (None for none)."""
    axes = tuple(axes)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def describe(sizes: Mapping[str, int]) -> str:
    """``"data 2 x tensor 4"``: the axes of size > 1 (or "one device")."""
    return " x ".join(f"{axis} {sizes[axis]}" for axis in AXES if sizes.get(axis, 1) > 1) or "one device"


def resolve_sizes(requested: Mapping[str, int], devices: int | None = None) -> dict[str, int]:
    """Every axis's size, in ``AXES`` order: ``requested`` (missing axes are 1)
    with at most one -1 inferred from ``devices``. Raises ``BadInput`` for a
    size that is not positive or sizes that cannot fill ``devices``, and
    TypeError for an axis that does not exist (a programming error, like an
    unknown keyword argument)."""
    unknown = [name for name in requested if name not in AXES]
    if unknown:
        raise TypeError(f"unknown mesh axis {unknown[0]!r}; the axes are {', '.join(AXES)}.")
    sizes = {axis: int(requested.get(axis, 1)) for axis in AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise BadInput(f"Mesh axis {axis!r} has size {size}; sizes must be positive (or -1 for one inferred axis).")
    inferred = [axis for axis, size in sizes.items() if size == -1]
    if len(inferred) > 1:
        raise BadInput(f"Only one mesh axis may be -1 (inferred), but {inferred} are; give explicit sizes for all but one.")
    known = math.prod(size for size in sizes.values() if size != -1)
    if inferred:
        if devices is None or devices % known:
            where = "the device count (unknown here)" if devices is None else f"the {devices} devices"
            raise BadInput(
                f"Cannot infer mesh axis {inferred[0]!r}: the other axes multiply to {known}, which does not "
                f"divide {where}; give its size."
            )
        sizes[inferred[0]] = devices // known
    return sizes
