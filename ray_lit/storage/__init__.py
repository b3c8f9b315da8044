"""ray_lit.storage."""
