"""Parallel Flax NNX layers, each one rank's math with its collectives spelled
out. Their parameters carry their PartitionSpecs (``sharding/rules.py``).
Import them from their modules, or from ``lite_tp_jax``."""
