"""Driver preemption (issue 5): SIGKILL of the whole driver process group, or SIGTERM to the
driver, then the same script run again continues from the latest committed checkpoint and ends
with the weights of an uninterrupted run."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytestmark = pytest.mark.ray

SCRIPT = textwrap.dedent('''
    import os, sys, time
    import ray, torch
    from torch.utils.data import DataLoader, TensorDataset
    import ray_lit, ray_lit as pl

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                           torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
        def training_step(self, batch, batch_idx):
            time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    storage, name, out = sys.argv[1], sys.argv[2], sys.argv[3]
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    pl.seed_everything(5)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(128, 8, generator=g)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)
    model = Net()
    trainer = ray_lit.fit(model, loader, num_workers=2, max_epochs=2, storage_path=storage,
                          run_name=name, checkpoint_every_n_steps=2, logger=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False)
    torch.save({"state_dict": model.state_dict(), "global_step": trainer.global_step}, out)
    ray.shutdown()
''')


def _run(tmp_path, name: str, env_extra: dict | None = None, **popen) -> subprocess.Popen:
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **(env_extra or {}))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "runs"), name,
                             str(tmp_path / f"{name}.pt")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _committed_steps(tmp_path, name: str) -> list[int]:
    steps = []
    for path in glob.glob(str(tmp_path / "runs" / name / "checkpoints" / "*" / "manifest.json")):
        try:
            with open(path) as f:
                steps.append(json.load(f)["global_step"])
        except (OSError, ValueError):
            pass
    return steps


def _wait_for_commit(tmp_path, name: str, proc: subprocess.Popen, min_step: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(s >= min_step for s in _committed_steps(tmp_path, name)):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("no committed checkpoint appeared")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    proc = _run(tmp, "ref")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return torch.load(tmp / "ref.pt")


def _assert_same(reference, result):
    assert result["global_step"] == reference["global_step"] == 16
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, result["state_dict"][key]), key


def test_sigkill_of_the_driver_group_then_rerun_resumes_exactly(tmp_path, reference):
    proc = _run(tmp_path, "killed", {"STEP_SLEEP": "0.15"}, start_new_session=True)
    try:
        _wait_for_commit(tmp_path, "killed", proc, min_step=4)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's own process group only
        proc.wait(timeout=30)
    steps_at_kill = max(_committed_steps(tmp_path, "killed"))
    assert steps_at_kill < 16
    again = _run(tmp_path, "killed")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "restoring from" in out
    _assert_same(reference, torch.load(tmp_path / "killed.pt"))


def test_sigterm_checkpoints_and_stops_then_rerun_resumes_exactly(tmp_path, reference):
    proc = _run(tmp_path, "termed", {"STEP_SLEEP": "0.15"}, start_new_session=True)
    try:
        _wait_for_commit(tmp_path, "termed", proc, min_step=2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "preemption checkpoint" in out, out
    assert not (tmp_path / "termed.pt").exists()
    again = _run(tmp_path, "termed")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    _assert_same(reference, torch.load(tmp_path / "termed.pt"))
