"""The error users are meant to see: ``BadInput`` and its subclasses.

``lite-tp`` turns a ``BadInput`` into one line on stderr and exit 2; anything
else is a bug (a traceback, exit 1). Each layer subclasses ``BadInput`` for its
own kind of input (config, data, checkpoint, run directory, Hugging Face
files); ``FitError`` is the one for sizes that do not fit each other.
No jax here.
"""

from __future__ import annotations

from collections.abc import Callable


class BadInput(ValueError):
    """Input the user controls is wrong: one sentence naming what is wrong and what would be right."""


class FitError(BadInput):
    """Sizes that do not fit each other (a batch over the mesh, layers over stages, heads over kv heads).

    The message is a template whose fields (``{global_batch}``, ``{data}``, ...)
    name the quantities; ``str()`` shows them as ``name (value)``, and a caller
    that knows where they come from shows them in its own terms, e.g. the
    config layer as ``'train.global_batch' (3)`` (``format``). A template may
    also write ``{field.name}`` or ``{field.value!r}`` alone."""

    def __init__(self, template: str, **values: object):
        self.template, self.values = template, values
        super().__init__(self.format(lambda name: name))

    def format(self, name_of: Callable[[str], str]) -> str:
        """The message with each field shown as ``name_of(field) (value)``."""
        return self.template.format(**{field: _Shown(name_of(field), value) for field, value in self.values.items()})


class _Shown:
    """A field of a ``FitError`` message: ``name (value)``, or its ``.name`` or ``.value``."""

    def __init__(self, name: str, value: object):
        self.name, self.value = name, value

    def __format__(self, spec: str) -> str:
        return f"{self.name} ({self.value})"
