"""``to_torchscript`` / ``to_onnx`` on a real ``pl.LightningModule``."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import ray_lit as pl
from ray_lit.errors import MisconfigurationException

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated


class MLP(pl.LightningModule):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Dropout(0.5),
                                 nn.Linear(hidden, 2))
        self.example_input_array = torch.randn(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.get("lr", 0.1))


class _FakeTrainer:
    """Stands in for an attached Trainer (it must not end up in the compiled module)."""

    current_epoch = 2
    global_step = 10


@pytest.fixture
def model() -> MLP:
    torch.manual_seed(0)
    return MLP()


def _expected(model: MLP, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    return out


@pytest.mark.parametrize("method", ["script", "trace"])
def test_torchscript_matches_module_and_file(model, method, tmp_path):
    x = torch.randn(5, 4)
    expected = _expected(model, x)
    path = tmp_path / "out" / f"{method}.pt"
    compiled = model.to_torchscript(file_path=str(path), method=method)
    assert model.training  # the training mode came back
    assert all(m.training for m in model.modules())
    torch.testing.assert_close(compiled(x), expected)
    loaded = torch.jit.load(str(path))
    torch.testing.assert_close(loaded(x), expected)


def test_trace_with_explicit_inputs_and_eval_mode_kept(model):
    model.eval()
    compiled = model.to_torchscript(method="trace", example_inputs=torch.randn(2, 4))
    assert not model.training
    x = torch.randn(2, 4)
    torch.testing.assert_close(compiled(x), model(x))


def test_submodule_modes_are_restored(model):
    model.train()
    model.net[2].eval()  # a deliberately frozen part
    model.to_torchscript()
    assert model.training and not model.net[2].training


def test_script_with_attached_trainer_saves_and_loads(model, tmp_path):
    trainer = _FakeTrainer()
    model.trainer = trainer
    path = tmp_path / "with_trainer.pt"
    model.to_torchscript(file_path=str(path))
    assert model.trainer is trainer
    x = torch.randn(2, 4)
    torch.testing.assert_close(torch.jit.load(str(path))(x), _expected(model, x))


def test_bad_method_and_missing_trace_inputs(model):
    with pytest.raises(ValueError, match="script.*trace"):
        model.to_torchscript(method="compile")
    model.example_input_array = None
    with pytest.raises(ValueError, match="example_inputs"):
        model.to_torchscript(method="trace")


def test_to_onnx_without_onnx_package(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # "import onnx" raises ImportError
    with pytest.raises(MisconfigurationException, match=r"pip install 'ray_lit\[onnx\]'"):
        model.to_onnx(str(tmp_path / "m.onnx"))


def test_to_onnx_needs_an_input_sample(model, tmp_path):
    pytest.importorskip("onnx")
    model.example_input_array = None
    with pytest.raises(ValueError, match="input_sample"):
        model.to_onnx(str(tmp_path / "m.onnx"))


def test_to_onnx_writes_a_valid_model(model, tmp_path):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "onnx" / "m.onnx"
    model.to_onnx(str(path), input_names=["x"], output_names=["y"])
    assert model.training
    exported = onnx.load(str(path))
    onnx.checker.check_model(exported)
    assert [i.name for i in exported.graph.input] == ["x"]
    dims = [d.dim_value for d in exported.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, 4]
