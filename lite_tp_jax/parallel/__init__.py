"""Running one rank's math: regions (shard_map entry), the pipeline schedule,
and gradient norms."""
