"""ray_lit.core."""
