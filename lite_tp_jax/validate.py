"""Input checks shared by the layers: one sentence naming what is wrong and what would be right."""

from __future__ import annotations

import numbers

import jax


def check_positive_int(owner: str, **sizes) -> None:
    """Raises ValueError naming ``owner`` and the first size that is not a
    positive integer (bools and floats such as 64.0 are refused too)."""
    for name, value in sizes.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{owner} {name} must be a positive integer, got {value!r}.")


def check_last_dim(x: jax.Array, expected: int, name: str) -> None:
    """``x``'s last dimension must be ``expected`` (a layer's input features)."""
    if x.ndim < 1 or x.shape[-1] != expected:
        raise ValueError(
            f"{name} expects inputs whose last dimension is {expected}, got shape {tuple(x.shape)}."
        )


def check_rank(x: jax.Array, ndim: int, layout: str, name: str) -> None:
    """``x`` must have ``ndim`` dims, laid out as ``layout`` (e.g. "[batch, seq, features]")."""
    if x.ndim != ndim:
        raise ValueError(f"{name} expects inputs {layout}, got shape {tuple(x.shape)}.")


class FitError(ValueError):
    """Sizes that do not fit each other (a batch over the mesh, layers over stages).

    The message is a template whose fields (``{global_batch}``, ``{data}``, ...)
    name the quantities; ``str()`` shows them as ``name (value)``, and a caller
    that knows where they come from shows them in its own terms, e.g. the
    config layer as ``'train.global_batch' (3)`` (``format``)."""

    def __init__(self, template: str, **values: object):
        self.template, self.values = template, values
        super().__init__(self.format(lambda name: name))

    def format(self, name_of) -> str:
        """The message with each field shown as ``name_of(field) (value)``."""
        return self.template.format(**{field: f"{name_of(field)} ({value})" for field, value in self.values.items()})
