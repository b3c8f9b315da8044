"""ray_lit.metrics."""
