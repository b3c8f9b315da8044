"""Callbacks: they run where the loop runs (inside each worker when distributed)."""

from ray_lit.callbacks.base import Callback

__all__ = ["Callback"]
