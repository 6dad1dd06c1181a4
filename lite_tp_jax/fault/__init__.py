"""Fault tolerance: abort and restart (``restart.py``) and data-parallel fallback to a spare (``spare.py``)."""
