"""The error of the Hugging Face interop: ``HFError``, a ``BadInput`` (one line, exit 2)."""

from __future__ import annotations

from lite_tp_jax.core.errors import BadInput


class HFError(BadInput):
    """A Hugging Face checkpoint or config this module cannot use, in one sentence."""
