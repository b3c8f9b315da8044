"""ray_lit.metrics: the functional metrics of Lightning 0.9 (``pl.metrics.functional``).

Usage, as in the seed idiom::

    from ray_lit.metrics import functional as FM
    acc = FM.accuracy(logits, y)          # [N, C] logits are arg-maxed

They compute on the tensors they are given (one rank's batch); cross-rank reduction is the
logging layer's job (``self.log(..., sync_dist=True)``).
"""

from ray_lit.metrics import functional

__all__ = ["functional"]
