"""Functional metrics of the PyTorch Lightning 0.9 era (``pl.metrics.functional``).

Classification metrics take ``pred`` either as labels (same shape as ``target``) or as scores
with one more dimension (``[N, C]`` logits or probabilities), which are arg-maxed over dim 1.
Every function returns a float tensor on the inputs' device and works inside ``training_step``
on any rank (nothing is synchronised across ranks; log the result with ``sync_dist=True`` for a
global value).

``reduction`` (classification, per class): ``"elementwise_mean"`` averages over classes (macro),
``"sum"`` adds them, ``"none"`` returns one value per class. Classes with an undefined score
(0/0) count as 0, as in Lightning 0.9. ``accuracy`` is the exception: its mean is the fraction
of correct predictions over all samples (micro), as in 0.9.
"""

from __future__ import annotations

import torch

_REDUCTIONS = ("elementwise_mean", "sum", "none")

__all__ = [
    "accuracy", "confusion_matrix", "f1", "f1_score", "fbeta", "fbeta_score", "mae",
    "mean_absolute_error", "mean_squared_error", "mse", "precision", "precision_recall",
    "recall", "reduce", "rmse", "stat_scores_multiple_classes", "to_categorical", "to_onehot",
]


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce with ``"elementwise_mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: another reduction.
    """
    if reduction == "elementwise_mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction={reduction!r} is not supported; choose one of {_REDUCTIONS}.")


def to_onehot(tensor: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Dense labels ``[N, d1, ...]`` to one-hot ``[N, C, d1, ...]`` (same dtype).

    Example:
        >>> to_onehot(torch.tensor([1, 2, 0]))
        tensor([[0, 1, 0],
                [0, 0, 1],
                [1, 0, 0]])
    """
    if num_classes is None:
        num_classes = int(tensor.max().item()) + 1
    shape = (tensor.shape[0], num_classes, *tensor.shape[1:])
    onehot = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    index = tensor.long().unsqueeze(1).expand(shape)
    return onehot.scatter_(1, index, 1)


def to_categorical(tensor: torch.Tensor, argmax_dim: int = 1) -> torch.Tensor:
    """Scores (probabilities or logits) to labels by arg-max over ``argmax_dim``."""
    return torch.argmax(tensor, dim=argmax_dim)


def stat_scores_multiple_classes(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class true positives, false positives, true negatives, false negatives, support.

    Returns:
        Five float tensors of shape ``[num_classes]``.
    """
    pred, target, num_classes = _labels(pred, target, num_classes)
    match = (pred == target).float()
    tps = torch.zeros(num_classes, device=pred.device).scatter_add_(0, pred, match)
    fps = torch.zeros(num_classes, device=pred.device).scatter_add_(0, pred, 1 - match)
    fns = torch.zeros(num_classes, device=pred.device).scatter_add_(0, target, 1 - match)
    sups = torch.zeros(num_classes, device=pred.device).scatter_add_(
        0, target, torch.ones_like(match))
    tns = pred.numel() - (tps + fps + fns)
    return tps, fps, tns, fns, sups


def accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int | None = None,
             reduction: str = "elementwise_mean") -> torch.Tensor:
    """Fraction of correct predictions.

    Args:
        pred: labels, or ``[N, C]`` scores (arg-maxed).
        target: labels ``[N]``.
        num_classes: number of classes (default: inferred from ``pred`` and ``target``).
        reduction: ``"elementwise_mean"`` / ``"sum"``: correct / total over all samples;
            ``"none"``: per class, correct / support of that class.

    Example:
        >>> accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 2]))
        tensor(0.7500)
    """
    if reduction not in _REDUCTIONS:
        reduce(pred, reduction)  # raises the ValueError naming the choices
    tps, _, _, _, sups = stat_scores_multiple_classes(pred, target, num_classes)
    if reduction == "none":
        return _safe_div(tps, sups)
    return tps.sum() / sups.sum().clamp_min(1)


def precision_recall(pred: torch.Tensor, target: torch.Tensor, num_classes: int | None = None,
                     reduction: str = "elementwise_mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class precision tp / (tp + fp) and recall tp / (tp + fn), reduced over classes."""
    tps, fps, _, fns, _ = stat_scores_multiple_classes(pred, target, num_classes)
    return (reduce(_safe_div(tps, tps + fps), reduction),
            reduce(_safe_div(tps, tps + fns), reduction))


def precision(pred: torch.Tensor, target: torch.Tensor, num_classes: int | None = None,
              reduction: str = "elementwise_mean") -> torch.Tensor:
    """Precision tp / (tp + fp) per class, reduced (macro mean by default).

    Example:
        >>> precision(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 2]))
        tensor(0.7500)
    """
    return precision_recall(pred, target, num_classes, reduction)[0]


def recall(pred: torch.Tensor, target: torch.Tensor, num_classes: int | None = None,
           reduction: str = "elementwise_mean") -> torch.Tensor:
    """Recall tp / (tp + fn) per class, reduced (macro mean by default).

    Example:
        >>> recall(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 2]))
        tensor(0.6250)
    """
    return precision_recall(pred, target, num_classes, reduction)[1]


def fbeta(pred: torch.Tensor, target: torch.Tensor, beta: float,
          num_classes: int | None = None, reduction: str = "elementwise_mean") -> torch.Tensor:
    """F-beta per class, (1 + b^2) p r / (b^2 p + r), reduced over classes.

    ``beta < 1`` weighs precision more, ``beta > 1`` recall.

    Example:
        >>> fbeta(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 2]), beta=0.2)
        tensor(0.7407)
    """
    prec, rec = precision_recall(pred, target, num_classes, reduction="none")
    score = _safe_div((1 + beta**2) * prec * rec, beta**2 * prec + rec)
    return reduce(score, reduction)


def f1_score(pred: torch.Tensor, target: torch.Tensor, num_classes: int | None = None,
             reduction: str = "elementwise_mean") -> torch.Tensor:
    """F1 (harmonic mean of precision and recall) per class, reduced.

    Example:
        >>> f1_score(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 2]))
        tensor(0.6667)
    """
    return fbeta(pred, target, 1.0, num_classes, reduction)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int | None = None,
                     normalize: bool = False) -> torch.Tensor:
    """``C[i, j]``: samples of true class ``i`` predicted as ``j`` (float ``[C, C]``).

    Args:
        normalize: divide each row by its class's support (rows of absent classes stay 0).
    """
    pred, target, num_classes = _labels(pred, target, num_classes)
    bins = torch.bincount(target * num_classes + pred, minlength=num_classes**2)
    matrix = bins[: num_classes**2].reshape(num_classes, num_classes).float()
    if normalize:
        matrix = _safe_div(matrix, matrix.sum(dim=1, keepdim=True))
    return matrix


def mse(pred: torch.Tensor, target: torch.Tensor,
        reduction: str = "elementwise_mean") -> torch.Tensor:
    """Mean squared error (``reduction="none"``: the squared errors)."""
    return reduce((pred.float() - target.float()) ** 2, reduction)


def rmse(pred: torch.Tensor, target: torch.Tensor,
         reduction: str = "elementwise_mean") -> torch.Tensor:
    """Root of ``mse`` with the same reduction."""
    return torch.sqrt(mse(pred, target, reduction))


def mae(pred: torch.Tensor, target: torch.Tensor,
        reduction: str = "elementwise_mean") -> torch.Tensor:
    """Mean absolute error (``reduction="none"``: the absolute errors)."""
    return reduce((pred.float() - target.float()).abs(), reduction)


# 0.9 and later names for the same functions
f1 = f1_score
fbeta_score = fbeta
mean_squared_error = mse
mean_absolute_error = mae


def _labels(pred: torch.Tensor, target: torch.Tensor,
            num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat long labels of ``pred`` (arg-maxed when it has scores) and ``target``."""
    if pred.ndim == target.ndim + 1:
        if num_classes is None:
            num_classes = pred.shape[1]
        pred = to_categorical(pred, argmax_dim=1)
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.numel()} labels but target has {target.numel()}; "
                         "pass one prediction per target (or [N, C] scores).")
    if num_classes is None:
        highest = max(int(pred.max().item()) if pred.numel() else 0,
                      int(target.max().item()) if target.numel() else 0)
        num_classes = highest + 1
    if pred.numel() and (int(pred.max()) >= num_classes or int(target.max()) >= num_classes
                         or int(pred.min()) < 0 or int(target.min()) < 0):
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}); pass the right "
                         "num_classes or class indices.")
    return pred, target, num_classes


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den`` is 0 (an undefined score counts as 0)."""
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1, den))
