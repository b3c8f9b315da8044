"""ray_lit.checkpoint."""
