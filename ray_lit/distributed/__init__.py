"""ray_lit.distributed."""
