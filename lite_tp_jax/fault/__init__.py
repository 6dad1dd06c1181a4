"""Surviving failures: abort and restart the whole job (``restart.py``), or a
spare device that takes a failed one's place (``spare.py``)."""

from lite_tp_jax.fault.spare import DEVICE_LOST_EXIT, DeviceLost, Spares

__all__ = ["DEVICE_LOST_EXIT", "DeviceLost", "Spares"]
