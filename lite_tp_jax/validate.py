"""Argument checks shared by the layer constructors."""

from __future__ import annotations

import numbers


def check_positive_int(owner: str, **sizes) -> None:
    """Raises ValueError naming ``owner`` and the first size that is not a
    positive integer (bools and floats such as 64.0 are refused too)."""
    for name, value in sizes.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{owner} {name} must be a positive integer, got {value!r}.")
