"""Small input checks shared by the layers and the configs: one sentence
naming what is wrong and what would be right. No jax here."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

from lite_tp_jax.core.errors import FitError

Array = Any
"""An array with ``shape`` and ``ndim`` (jax or numpy): no jax import here."""


def check_positive_int(owner: str, **sizes) -> None:
    """Raises ValueError naming ``owner`` and the first size that is not a
    positive integer (bools and floats such as 64.0 are refused too)."""
    for name, value in sizes.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{owner} {name} must be a positive integer, got {value!r}.")


def check_last_dim(x: Array, expected: int, name: str) -> None:
    """``x``'s last dimension must be ``expected`` (a layer's input features)."""
    if x.ndim < 1 or x.shape[-1] != expected:
        raise ValueError(
            f"{name} expects inputs whose last dimension is {expected}, got shape {tuple(x.shape)}."
        )


def check_rank(x: Array, ndim: int, layout: str, name: str) -> None:
    """``x`` must have ``ndim`` dims, laid out as ``layout`` (e.g. "[batch, seq, features]")."""
    if x.ndim != ndim:
        raise ValueError(f"{name} expects inputs {layout}, got shape {tuple(x.shape)}.")


def check_heads(num_heads: int, num_kv_heads: int, hidden_size: int, head_dim: int | None, rope: bool) -> None:
    """Attention heads that fit together (``ParallelAttention`` and ``ModelConfig``
    both ask here): kv heads divide the query heads, a derived head_dim divides
    the hidden size, and RoPE rotates pairs. ``FitError`` naming the fields."""
    if num_heads % num_kv_heads:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise FitError(
            "{num_heads} must be a multiple of {num_kv_heads}: each kv head serves a whole group of "
            f"query heads; choose {{num_kv_heads.name}} among {divisors}",
            num_heads=num_heads, num_kv_heads=num_kv_heads,
        )
    if head_dim is None and hidden_size % num_heads:
        raise FitError(
            "{hidden_size} must be a multiple of {num_heads} while {head_dim.name} is null; "
            "set {head_dim.name} or change the sizes",
            hidden_size=hidden_size, num_heads=num_heads, head_dim=None,
        )
    resolved = hidden_size // num_heads if head_dim is None else head_dim
    if rope and resolved % 2:
        raise FitError("{head_dim} must be even with RoPE, which rotates pairs", head_dim=resolved)


# --- config fields: ranges declared with the field --------------------------------


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a config number may take; ``also``: values accepted outside it (a mesh axis's -1)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo < value rather than lo <= value
    hi_open: bool = False
    also: tuple[Any, ...] = ()

    def contains(self, value: float) -> bool:
        if value in self.also:
            return True
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None and not (self.lo_open or self.hi_open):
            text = f" between {self.lo:g} and {self.hi:g}"
        else:
            parts = []
            if self.lo is not None:
                parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
            if self.hi is not None:
                parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
            text = (" " + " and ".join(parts)) if parts else ""
        if self.also:
            text += " (or " + ", ".join("null" if v is None else repr(v) for v in self.also) + ")"
        return text


POSITIVE = Range(1)
NON_NEGATIVE = Range(0)
ABOVE_ZERO = Range(0, lo_open=True)
FRACTION = Range(0, 1)


def ranged(default: Any, bounds: Range) -> Any:
    """A dataclass field with ``default`` whose values must lie in ``bounds``
    (the config loader checks it: ``run/config_file.py``)."""
    return dataclasses.field(default=default, metadata={"range": bounds})


def range_of(field: dataclasses.Field) -> Range:
    """The declared range of a config field (any value when none is declared)."""
    return field.metadata.get("range", Range())
