"""Before and beside a run: the planner, device profiles, and ``lite-tp bench``
with its reference model."""
