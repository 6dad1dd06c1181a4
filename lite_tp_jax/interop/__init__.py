"""Weights in and out of other ecosystems: Hugging Face (``hf.py``)."""

from lite_tp_jax.interop.hf import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
