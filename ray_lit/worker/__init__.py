"""ray_lit.worker."""
