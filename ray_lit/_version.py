"""The package version (a leaf: checkpoints record it)."""

__version__ = "0.1.0"
