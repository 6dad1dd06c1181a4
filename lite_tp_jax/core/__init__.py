"""Ground: the mesh axes, the error types and small checks (no jax); mesh
construction, the collectives and HLO accounting."""
