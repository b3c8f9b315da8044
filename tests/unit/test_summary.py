"""ModelSummary: the layer table, depth limits and parameter totals."""

from __future__ import annotations

import pytest
import torch

from ray_lit.core.summary import ModelSummary, get_human_readable_count, summarize


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(10, 100), torch.nn.ReLU())
        self.head = torch.nn.Linear(100, 3)
        self.frozen = torch.nn.Linear(3, 3, bias=False)
        self.frozen.weight.requires_grad = False


@pytest.mark.parametrize(("number", "text"), [
    (0, "0  "), (123, "123  "), (1234, "1.2 K"), (12_345, "12.3 K"), (123_456, "123 K"),
    (3_400_000, "3.4 M"), (2 * 10**9, "2.0 B"), (10**16, "10,000 T")])
def test_human_readable_count(number, text):
    assert get_human_readable_count(number) == text


def test_totals():
    summary = summarize(Net())
    total = 10 * 100 + 100 + 100 * 3 + 3 + 9
    assert summary.total_parameters == total
    assert summary.trainable_parameters == total - 9
    assert summary.model_size == pytest.approx(total * 4 / 1e6)


def test_table_top_level():
    text = str(summarize(Net()))
    lines = text.splitlines()
    assert lines[0].split("|") == ["  ", " Name    ", " Type       ", " Params"]
    assert set(lines[1]) == {"-"}
    assert lines[2].split() == ["0", "|", "encoder", "|", "Sequential", "|", "1.1", "K"]
    assert lines[3].split() == ["1", "|", "head", "|", "Linear", "|", "303"]
    assert lines[4].split() == ["2", "|", "frozen", "|", "Linear", "|", "9"]
    assert lines[-4:] == ["1.4 K     Trainable params", "9         Non-trainable params",
                          "1.4 K     Total params",
                          "0.006     Total estimated model params size (MB)"]


def test_depth():
    assert summarize(Net(), max_depth=1).layer_names == ["encoder", "head", "frozen"]
    assert summarize(Net(), max_depth=2).layer_names == [
        "encoder", "encoder.0", "encoder.1", "head", "frozen"]
    assert summarize(Net(), max_depth=-1).layer_names == summarize(Net(), 2).layer_names
    assert ModelSummary(Net(), mode="full").layer_types[1:3] == ["Linear", "ReLU"]
    empty = str(summarize(Net(), max_depth=0)).splitlines()
    assert empty[0].startswith("  | Name") and set(empty[1]) == set(empty[2]) == {"-"}
    with pytest.raises(ValueError, match="max_depth"):
        ModelSummary(Net(), max_depth=-2)
    with pytest.raises(ValueError, match="mode"):
        ModelSummary(Net(), mode="all")


def test_shared_parameters_counted_once():
    net = Net()
    net.tied = net.head  # the same module twice
    assert summarize(net).total_parameters == summarize(Net()).total_parameters


def test_lazy_modules_count_zero():
    net = torch.nn.Sequential(torch.nn.LazyLinear(4))
    assert summarize(net).total_parameters == 0
    assert "Total params" in str(summarize(net))
