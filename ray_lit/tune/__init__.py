"""ray_lit.tune."""
