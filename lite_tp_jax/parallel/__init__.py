"""Parallelism across layers: pipeline schedules."""
