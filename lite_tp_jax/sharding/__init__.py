"""How arrays split over the mesh: the rule table, padding for uneven shards,
and the logical (unpadded, unstacked) state."""
