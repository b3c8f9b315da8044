"""A ``ClassificationTask`` that trains ANY ``nn.Module`` (the seed docs' "task" idea), then
exports the trained network for use without ray_lit.

The task owns the training logic (loss, metrics, optimizer); the network is passed in and stays
a plain ``nn.Module``. After ``fit`` and ``trainer.test``, the task is exported with
``to_torchscript`` (and ``to_onnx`` when the ``onnx`` package is installed), the exported files
are loaded back *outside* the task, and their outputs are checked against the module's.

Data is generated (3 classes in 16 dimensions); nothing is downloaded.
Run: ``python train.py`` (about 30 s on 2 CPU cores, most of it starting Ray).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
import ray_lit as pl
from ray_lit.metrics import functional as FM

FEATURES, CLASSES = 16, 3


def make_data(n: int, seed: int) -> TensorDataset:
    centers = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0)) * 0.9
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, FEATURES, generator=g), y)


def backbone(name: str) -> nn.Module:
    """Any network with ``[N, FEATURES] -> [N, CLASSES]`` logits will do."""
    if name == "mlp":
        return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    if name == "cnn":  # treats the features as a 1-channel signal
        return nn.Sequential(nn.Unflatten(1, (1, FEATURES)), nn.Conv1d(1, 8, 3, padding=1),
                             nn.ReLU(), nn.Flatten(), nn.Linear(8 * FEATURES, CLASSES))
    raise ValueError(f"unknown backbone {name!r}: use 'mlp' or 'cnn'")


class ClassificationTask(pl.LightningModule):
    """Classification with cross-entropy for whatever ``model`` is given."""

    def __init__(self, model: nn.Module, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])  # the network is an object, not a setting
        self.model = model
        self.example_input_array = torch.zeros(2, FEATURES)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._shared_eval_step(batch)
        self.log_dict({"val_loss": loss, "val_acc": acc}, prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx):
        loss, acc = self._shared_eval_step(batch)
        self.log_dict({"test_loss": loss, "test_acc": acc}, sync_dist=True)

    def _shared_eval_step(self, batch):
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits, y), FM.accuracy(logits, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr)


def export_and_check(task: ClassificationTask, out_dir: str) -> None:
    """Export the trained task and compare the exports' outputs with the network's."""
    x = make_data(64, 9).tensors[0]
    task.eval()
    with torch.no_grad():
        expected = task.model(x)

    path = os.path.join(out_dir, "model.pt")
    task.to_torchscript(file_path=path)  # scripted, saved with torch.jit.save
    scripted = torch.jit.load(path)      # outside the task: no ray_lit needed to run this
    with torch.no_grad():
        got = scripted(x)
    torch.testing.assert_close(got, expected)
    print(f"TorchScript export {path}: outputs equal the module's")

    try:
        import onnx
    except ImportError:
        print("onnx is not installed: skipping to_onnx (pip install 'ray_lit[onnx]')")
        return
    path = os.path.join(out_dir, "model.onnx")
    task.to_onnx(path, input_sample=x[:2], input_names=["x"], output_names=["logits"],
                 dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(onnx.load(path))
    try:
        import onnxruntime as ort

        got = ort.InferenceSession(path).run(None, {"x": x.numpy()})[0]
        runner = "onnxruntime"
    except ImportError:  # onnx's own reference evaluator runs the graph in numpy
        from onnx.reference import ReferenceEvaluator

        got = ReferenceEvaluator(path).run(None, {"x": x.numpy()})[0]
        runner = "onnx.reference"
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)
    print(f"ONNX export {path}: outputs equal the module's ({runner})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-workers", type=int, default=2,
                        help="Ray workers (0 trains in this process without Ray)")
    parser.add_argument("--backbone", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--max-epochs", type=int, default=3)
    args = parser.parse_args()

    pl.seed_everything(3)
    train = DataLoader(make_data(3072, 1), batch_size=64, shuffle=True)
    val = DataLoader(make_data(512, 2), batch_size=128)
    test = DataLoader(make_data(512, 3), batch_size=128)
    task = ClassificationTask(backbone(args.backbone))
    trainer = ray_lit.fit(task, train, val, num_workers=args.num_workers,
                          max_epochs=args.max_epochs, default_root_dir=os.path.abspath("runs"))
    result = trainer.test(test_dataloaders=test)  # the best checkpoint, on the workers
    assert result[0]["test_acc"] > 0.85, result

    os.makedirs("runs", exist_ok=True)
    export_and_check(task, "runs")


if __name__ == "__main__":
    main()
