"""ray_lit.driver."""
