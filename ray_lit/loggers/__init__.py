"""ray_lit.loggers."""
