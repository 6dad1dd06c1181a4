"""A run's durable parts: the config (all sections), checkpoints and the
optimizer factory."""
