"""``ray_lit.metrics.functional`` against hand-computed numbers.

The running example: ``pred = [0, 1, 2, 3]``, ``target = [0, 1, 2, 2]`` (4 classes).

=====  ==  ==  ==  =======  =========  ======  ====
class  tp  fp  fn  support  precision  recall  f1
=====  ==  ==  ==  =======  =========  ======  ====
0      1   0   0   1        1          1       1
1      1   0   0   1        1          1       1
2      1   0   1   2        1          1/2     2/3
3      0   1   0   0        0          0/0->0  0
=====  ==  ==  ==  =======  =========  ======  ====
"""

from __future__ import annotations

import pytest
import torch

from ray_lit.metrics import functional as FM

PRED = torch.tensor([0, 1, 2, 3])
TARGET = torch.tensor([0, 1, 2, 2])


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32))


def test_accuracy_labels_and_logits():
    close(FM.accuracy(PRED, TARGET), 0.75)
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 3.0, 1.0], [0.5, 0.4, 0.1], [0.0, 0.0, 9.0]])
    target = torch.tensor([0, 1, 2, 2])
    acc = FM.accuracy(logits, target)  # arg-max: [0, 1, 0, 2] -> 3 of 4
    assert acc.dtype == torch.float32
    close(acc, 0.75)
    close(FM.accuracy(PRED, TARGET, reduction="none"), [1.0, 1.0, 0.5, 0.0])
    close(FM.accuracy(torch.tensor([0, 0]), torch.tensor([0, 0])), 1.0)  # all-zero target


def test_precision_recall_f1_fbeta_macro():
    close(FM.precision(PRED, TARGET), 0.75)
    close(FM.recall(PRED, TARGET), 0.625)
    close(FM.f1_score(PRED, TARGET), (1 + 1 + 2 / 3 + 0) / 4)
    assert FM.f1 is FM.f1_score and FM.fbeta_score is FM.fbeta
    # beta = 0.2 on class 2: 1.04 * 1 * 0.5 / (0.04 * 1 + 0.5) = 0.96296...
    close(FM.fbeta(PRED, TARGET, beta=0.2), (1 + 1 + 0.52 / 0.54 + 0) / 4)


def test_reductions_none_and_sum():
    close(FM.precision(PRED, TARGET, reduction="none"), [1.0, 1.0, 1.0, 0.0])
    close(FM.recall(PRED, TARGET, reduction="none"), [1.0, 1.0, 0.5, 0.0])
    close(FM.recall(PRED, TARGET, reduction="sum"), 2.5)
    close(FM.f1_score(PRED, TARGET, reduction="none"), [1.0, 1.0, 2 / 3, 0.0])
    with pytest.raises(ValueError, match="elementwise_mean"):
        FM.precision(PRED, TARGET, reduction="max")
    with pytest.raises(ValueError, match="elementwise_mean"):
        FM.accuracy(PRED, TARGET, reduction="max")


def test_num_classes_adds_absent_classes():
    # binary predictions scored as 3 classes: class 2 has no samples and counts as 0
    pred, target = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0])
    close(FM.precision(pred, target, num_classes=3, reduction="none"), [1.0, 0.5, 0.0])
    close(FM.recall(pred, target, num_classes=3, reduction="none"), [2 / 3, 1.0, 0.0])
    close(FM.precision(pred, target, num_classes=2), 0.75)
    with pytest.raises(ValueError, match="num_classes"):
        FM.accuracy(torch.tensor([5]), torch.tensor([0]), num_classes=3)


def test_confusion_matrix():
    cm = FM.confusion_matrix(PRED, TARGET)
    close(cm, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    normalized = FM.confusion_matrix(PRED, TARGET, normalize=True)
    close(normalized, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0, 0]])
    close(FM.confusion_matrix(torch.tensor([1]), torch.tensor([0]), num_classes=3),
          [[0, 1, 0], [0, 0, 0], [0, 0, 0]])
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    close(FM.confusion_matrix(logits, torch.tensor([1, 1])), [[0, 0], [1, 1]])


def test_regression_metrics():
    pred, target = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 4.0, 1.0])
    # errors 0, -2, 3: squared 0, 4, 9; absolute 0, 2, 3
    close(FM.mse(pred, target), 13 / 3)
    close(FM.mse(pred, target, reduction="sum"), 13.0)
    close(FM.mse(pred, target, reduction="none"), [0.0, 4.0, 9.0])
    close(FM.rmse(pred, target), (13 / 3) ** 0.5)
    close(FM.mae(pred, target), 5 / 3)
    close(FM.mean_absolute_error(pred, target, reduction="none"), [0.0, 2.0, 3.0])
    assert FM.mean_squared_error is FM.mse
    close(FM.mse(torch.tensor([1, 2]), torch.tensor([1, 4])), 2.0)  # ints become floats


def test_onehot_and_categorical():
    assert FM.to_onehot(torch.tensor([1, 2, 0])).tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    assert FM.to_onehot(torch.tensor([1]), num_classes=4).tolist() == [[0, 1, 0, 0]]
    assert FM.to_onehot(torch.tensor([[0, 1]])).shape == (1, 2, 2)  # [N, C, d1]
    assert FM.to_categorical(torch.tensor([[0.2, 0.5], [0.9, 0.1]])).tolist() == [1, 0]


def test_stat_scores_multiple_classes():
    tps, fps, tns, fns, sups = FM.stat_scores_multiple_classes(PRED, TARGET)
    assert tps.tolist() == [1, 1, 1, 0]
    assert fps.tolist() == [0, 0, 0, 1]
    assert fns.tolist() == [0, 0, 1, 0]
    assert tns.tolist() == [3, 3, 2, 3]
    assert sups.tolist() == [1, 1, 2, 0]


def test_import_path_of_the_seed_idiom():
    import ray_lit as pl
    from ray_lit.metrics import functional

    assert functional is FM
    assert pl.metrics.functional.accuracy is FM.accuracy
