"""ray_lit.loop."""
