"""ray_lit.fit on a local Ray cluster: 2 workers, gloo on loopback (issue 4)."""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import ray_lit
import ray_lit as pl
from ray_lit.loggers import Logger

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class IndexDataset(Dataset):
    """Sample i is (x_i, y_i, i): the index lets a test see which rank saw what."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Linear(pl.LightningModule):
    def __init__(self, out_dir: str = "", fail_rank: int = -1) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.layer = torch.nn.Linear(4, 1)
        self.out_dir = out_dir
        self.fail_rank = fail_rank

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        if self.global_rank == self.fail_rank and batch_idx == 1:
            raise ValueError("boom in training_step")
        if self.out_dir:
            with open(os.path.join(self.out_dir, f"seen_rank{self.global_rank}.txt"), "a") as f:
                f.write(" ".join(str(int(i)) for i in idx) + "\n")
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)

    def on_fit_end(self):
        if self.out_dir:
            torch.save({k: v.clone() for k, v in self.state_dict().items()},
                       os.path.join(self.out_dir, f"weights_rank{self.global_rank}.pt"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict, int]] = []
        self.hparams = None

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step):
        self.calls.append((dict(metrics), step))

    def log_hyperparams(self, params):
        self.hparams = params


def _options(tmp_path, **extra):
    base = dict(num_workers=2, max_epochs=2, default_root_dir=str(tmp_path),
                enable_progress_bar=False, enable_model_summary=False, logger=False,
                num_sanity_val_steps=0)
    base.update(extra)
    return base


def test_shards_disjoint_complete_and_replicas_identical(ray_cluster, tmp_path):
    model = Linear(out_dir=str(tmp_path))
    loader = DataLoader(IndexDataset(64), batch_size=8)
    trainer = ray_lit.fit(model, loader, **_options(tmp_path, max_epochs=1))
    seen = {}
    for rank in (0, 1):
        lines = (tmp_path / f"seen_rank{rank}.txt").read_text().split("\n")
        seen[rank] = [int(i) for line in lines if line for i in line.split()]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(64))
    w0 = torch.load(tmp_path / "weights_rank0.pt")
    w1 = torch.load(tmp_path / "weights_rank1.pt")
    for key in w0:
        assert torch.equal(w0[key], w1[key])
    # the driver's module holds rank 0's weights; the trainer describes the run
    for key, value in model.state_dict().items():
        assert torch.equal(value, w0[key])
    assert trainer.world_size_history == [2] and trainer.world_size == 2
    assert trainer.global_step == 4 and trainer.current_epoch == 1


def test_ddp_equals_one_process_on_the_union_of_batches(ray_cluster, tmp_path):
    dataset = IndexDataset(64)
    model = Linear()
    reference = Linear()
    ray_lit.fit(model, DataLoader(dataset, batch_size=8), **_options(tmp_path, max_epochs=2))
    # one process stepping on the union of both ranks' batches (same sampler order)
    from ray_lit.loop.sampler import ResumableDistributedSampler

    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for epoch in range(2):
        per_rank = []
        for rank in (0, 1):
            sampler = ResumableDistributedSampler(64, 2, rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
        for step in range(4):
            losses = []
            for rank in (0, 1):
                idx = per_rank[rank][step * 8:(step + 1) * 8]
                x, y = dataset.x[idx], dataset.y[idx]
                losses.append(torch.nn.functional.mse_loss(reference(x), y))
            loss = torch.stack(losses).mean()  # DDP averages the ranks' gradients
            opt.zero_grad()
            loss.backward()
            opt.step()
    for key, value in model.state_dict().items():
        assert torch.allclose(value, reference.state_dict()[key], atol=1e-6), key


def test_driver_loggers_metrics_and_validate_test(ray_cluster, tmp_path):
    logger = RecordingLogger()
    model = Linear()
    loader = DataLoader(IndexDataset(64), batch_size=8)
    trainer = pl.Trainer(**_options(tmp_path, logger=logger, log_every_n_steps=1))
    trainer.fit(model, loader, DataLoader(IndexDataset(32), batch_size=8))
    keys = {k for metrics, _ in logger.calls for k in metrics}
    assert {"train_loss_step", "train_loss_epoch", "val_loss", "epoch"} <= keys
    steps = [step for metrics, step in logger.calls if "train_loss_step" in metrics]
    assert steps == list(range(8))  # every step of rank 0, in order, on the driver
    assert set(trainer.callback_metrics) >= {"val_loss", "train_loss"}
    results = trainer.validate(dataloaders=DataLoader(IndexDataset(32), batch_size=8))
    assert len(results) == 1 and set(results[0]) == {"val_loss"}
    assert results[0]["val_loss"] == pytest.approx(float(trainer.callback_metrics["val_loss"]),
                                                   rel=1e-5)
    tested = trainer.test(test_dataloaders=DataLoader(IndexDataset(32), batch_size=8),
                          ckpt_path=None)
    assert set(tested[0]) == {"test_loss"}
    # the driver's save_checkpoint after a fit on workers: the weights, counters and
    # callbacks it holds, with a warning that the optimizer state stayed on the workers
    with pytest.warns(UserWarning, match="live on the Ray workers"):
        trainer.save_checkpoint(tmp_path / "driver.ckpt")
    saved = torch.load(tmp_path / "driver.ckpt", weights_only=True)
    assert saved["global_step"] == trainer.global_step == 8 and "callbacks" in saved
    assert "optimizer_states" not in saved
    for key, value in model.state_dict().items():
        assert torch.equal(saved["state_dict"][key], value)


def test_user_exception_reaches_driver_with_rank_and_traceback(ray_cluster, tmp_path):
    model = Linear(fail_rank=1)
    start = time.monotonic()
    with pytest.raises(ValueError, match="boom in training_step") as info:
        ray_lit.fit(model, DataLoader(IndexDataset(64), batch_size=8), **_options(tmp_path))
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "rank 1" in notes and "training_step" in notes
    assert time.monotonic() - start < 60


def test_unpicklable_module_is_named(ray_cluster, tmp_path):
    import threading

    model = Linear()
    model.helper = type("Helper", (), {})()
    model.helper.lock = threading.Lock()
    with pytest.raises(pl.MisconfigurationException, match=r"helper\.lock"):
        ray_lit.fit(model, DataLoader(IndexDataset(64), batch_size=8), **_options(tmp_path))


def test_more_workers_than_the_cluster_holds_fails_fast(ray_cluster, tmp_path):
    start = time.monotonic()
    with pytest.raises(pl.MisconfigurationException, match="CPU"):
        ray_lit.fit(Linear(), DataLoader(IndexDataset(64), batch_size=8),
                    **_options(tmp_path, num_workers=16))
    with pytest.raises(pl.MisconfigurationException, match="GPU"):
        ray_lit.fit(Linear(), DataLoader(IndexDataset(64), batch_size=8),
                    **_options(tmp_path, use_gpu=True))
    assert time.monotonic() - start < 20


def test_no_training_step_fails_before_workers_start(ray_cluster, tmp_path):
    class NoStep(pl.LightningModule):
        def configure_optimizers(self):
            return None

    with pytest.raises(pl.MisconfigurationException, match="training_step"):
        ray_lit.fit(NoStep(), DataLoader(IndexDataset(8)), **_options(tmp_path))


class GlobalSoftmax(Linear):
    """The seed's dp/ddp2 idiom: ``training_step_end`` sees every rank's outputs."""

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        return {"scores": self(x).squeeze(-1), "idx": idx.float()}

    def training_step_end(self, outputs):
        scores = outputs["scores"]  # [world_size, batch] after the all-gather
        if self.out_dir:
            with open(os.path.join(self.out_dir, f"shape_rank{self.global_rank}.txt"), "w") as f:
                f.write(" ".join(str(d) for d in scores.shape))
        # a softmax over the whole global batch, differentiable through the gather
        return {"loss": -torch.log_softmax(scores.reshape(-1), dim=0)[0]}


def test_step_end_gathers_every_rank_when_asked(ray_cluster, tmp_path):
    model = GlobalSoftmax(out_dir=str(tmp_path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ray_lit.fit(model, DataLoader(IndexDataset(32), batch_size=4),
                **_options(tmp_path, max_epochs=1, gather_step_outputs=True))
    for rank in (0, 1):
        assert (tmp_path / f"shape_rank{rank}.txt").read_text() == "2 4"
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def _assert_nothing_left(timeout_s: float = 20.0) -> None:
    """No live worker actor and no placement group remain (Ray reports deaths a bit late)."""
    import ray
    deadline = time.monotonic() + timeout_s
    while True:
        # public API only (``ray.util.state`` needs the dashboard, off in these tests): every
        # CPU back in the pool means no worker actor holds one any more
        total, free = ray.cluster_resources().get("CPU", 0), ray.available_resources()
        alive = [] if free.get("CPU", 0) == total else [f"{total - free.get('CPU', 0)} CPU"]
        groups = [g for g in ray.util.placement_group_table().values()
                  if g["state"] != "REMOVED"]
        if (not alive and not groups) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not alive and not groups


def test_nothing_is_left_on_the_cluster(ray_cluster, tmp_path):
    ray_lit.fit(Linear(), DataLoader(IndexDataset(32), batch_size=8),
                **_options(tmp_path, max_epochs=1))
    with pytest.raises(ValueError):
        ray_lit.fit(Linear(fail_rank=0), DataLoader(IndexDataset(32), batch_size=8),
                    **_options(tmp_path, max_epochs=1))
    _assert_nothing_left()


class Slow(Linear):
    def training_step(self, batch, batch_idx):
        time.sleep(0.2)
        return super().training_step(batch, batch_idx)


def test_ctrl_c_on_the_driver_releases_the_group(ray_cluster, tmp_path, default_sigint):
    import _thread
    import threading

    timer = threading.Timer(6.0, _thread.interrupt_main)  # Ctrl-C while workers train
    timer.start()
    try:
        trainer = pl.Trainer(**_options(tmp_path, max_epochs=50))
        trainer.fit(Slow(), DataLoader(IndexDataset(64), batch_size=8))
    finally:
        timer.cancel()
    assert trainer.interrupted  # 0.9: fit returns after an interrupt, the state says so
    assert trainer.global_step < 50 * 4
    _assert_nothing_left()


def test_a_worker_builds_its_serialization_context_without_pyarrow(ray_cluster):
    """Ray imports pyarrow (~25 MiB resident) into every actor that builds a serialization
    context; a ray_lit worker builds its own without it, and user code can still import it."""
    import pyarrow
    import ray

    from ray_lit.driver.worker_group import _RemoteWorker

    worker = _RemoteWorker.options(num_cpus=0).remote()
    try:
        # an argument that travels through the object store: deserialised with the context
        loaded = ray.get(worker.__ray_call__.remote(
            lambda self, _: sorted(m for m in sys.modules if m.split(".")[0] == "pyarrow"),
            ray.put(torch.ones(2))), timeout=60)
        assert loaded == []
        version = ray.get(worker.__ray_call__.remote(
            lambda self: __import__("pyarrow").__version__), timeout=60)
        assert version == pyarrow.__version__
    finally:
        ray.kill(worker)


def test_the_payload_is_read_from_shared_memory_without_a_heap_copy(ray_cluster):
    """The pickled run travels out of band, so a worker unpickles it straight from the object
    store (one copy of a driver-built data set less at every worker's peak)."""
    import numpy as np
    import ray

    from ray_lit.driver.launch import _ship

    data = torch.arange(1000.0)
    shipped = ray.get(_ship({"data": data}))
    assert isinstance(shipped, np.ndarray) and not shipped.flags.writeable  # a view, not a copy
    assert torch.equal(cloudpickle.loads(shipped)["data"], data)


def test_one_ranks_news_ends_every_ranks_long_poll(ray_cluster):
    """The driver long-polls the group; the first rank with news (here a checkpoint part)
    wakes the others, so the status of the whole group comes back at once."""
    import threading

    import ray

    from ray_lit.driver.worker_group import WorkerGroup, WorkerInfo, _RemoteWorker
    from ray_lit.messages import PartWritten
    from ray_lit.worker.ranks import WorkerRanks

    actors = [_RemoteWorker.options(num_cpus=0, max_concurrency=2).remote() for _ in range(3)]
    try:
        ray.get([a.poll.remote() for a in actors], timeout=60)  # started
        group = WorkerGroup([WorkerInfo(actor=a, ranks=WorkerRanks(i, i, 0, 3, 3),
                                        node_id="n", node_ip="127.0.0.1", gpu_ids=[], pid=0)
                             for i, a in enumerate(actors)], placement_group=None, owned=False)
        part = PartWritten("step-2", 1, 3, {"global_step": 2})
        timer = threading.Timer(0.5, lambda: actors[1].post.remote(part))
        timer.start()
        start = time.monotonic()
        statuses = group.statuses(wait_s=60)
        assert time.monotonic() - start < 30  # not the 60 s every quiet poll would wait
        assert [s.handed_over for s in statuses] == [(), (part,), ()]
    finally:
        for a in actors:
            ray.kill(a)
