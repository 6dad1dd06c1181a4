"""Partitioning: the rule table every sharding is read from, the planner and device profiles."""
