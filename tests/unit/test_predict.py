"""``trainer.predict`` in process, and the pieces of its distributed path that run without Ray
(issue 15 item 4). The hook order and writer arguments were checked against Lightning 2.6.6
(the same script run on both: identical calls, indices and return shapes)."""

from __future__ import annotations

import threading
import time

import cloudpickle
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

import ray_lit as pl
from ray_lit.callbacks import BasePredictionWriter
from ray_lit.driver.predictions import PredictionCollector, receive_predictions
from ray_lit.errors import MisconfigurationException
from ray_lit.loop.predict_loop import ChunkOutbox, PredictBatches, prepare_predict_loader
from ray_lit.messages import PredictionChunk, WorkerState, WorkerStatus

N = 7


class Indexed(Dataset):
    """Sample i is ``(x_i, i)``: a batch says which samples it holds."""

    def __init__(self, n: int = N) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 2)
        self.drop = torch.nn.Dropout(0.9)  # predictions are only exact in eval mode

    def forward(self, x):
        return self.drop(self.layer(x))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        x, _ = batch
        return self(x)


def _trainer(**options) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                      **options)


def _expected(model: Net, data: Indexed, batch_size: int) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = [model(data.x[i:i + batch_size]) for i in range(0, len(data), batch_size)]
    model.train()
    return out


# --- in process ------------------------------------------------------------------------------
def test_outputs_are_the_module_on_each_batch_in_eval_mode_without_grad():
    data, model = Indexed(), Net()
    seen = {}

    class Probe(pl.Callback):
        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx,
                                   dataloader_idx=0):
            seen.setdefault("modes", []).append(pl_module.training)
            seen.setdefault("grad", []).append(torch.is_grad_enabled())
            seen.setdefault("state", []).append(
                (trainer.state.fn, trainer.state.stage, trainer.predicting))

    trainer = _trainer(callbacks=[Probe()])
    out = trainer.predict(model, DataLoader(data, batch_size=3))
    expected = _expected(model, data, 3)
    assert len(out) == 3
    for got, want in zip(out, expected):
        assert torch.equal(got, want) and got.device.type == "cpu"
    assert seen["modes"] == [False] * 3 and seen["grad"] == [False] * 3
    assert seen["state"] == [("predict", "predict", True)] * 3
    assert model.training  # the module's own mode is back
    assert trainer.state.fn == "predict" and trainer.state.finished and not trainer.predicting
    assert trainer.num_predict_batches == [3]


@pytest.mark.parametrize("limit, batches", [(2, 2), (0.5, 1), (1.0, 3)])
def test_limit_predict_batches_stops_each_loader_early(limit, batches):
    data, model = Indexed(), Net()
    trainer = _trainer(limit_predict_batches=limit)
    out = trainer.predict(model, [DataLoader(data, batch_size=3), DataLoader(data, batch_size=4)])
    expected = _expected(model, data, 3)
    assert [len(o) for o in out] == [batches, min(batches, 2) if limit != 1.0 else 2]
    assert all(torch.equal(g, w) for g, w in zip(out[0], expected))
    assert trainer.num_predict_batches[0] == batches


def test_default_predict_step_calls_the_module_on_the_batch():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.layer(x) * 2

    data, model = torch.randn(5, 4), Plain()
    out = _trainer().predict(model, DataLoader(data, batch_size=2))
    with torch.no_grad():
        # close, not equal: a matmul over 5 rows may round unlike three over 2, 2 and 1
        torch.testing.assert_close(torch.cat(out), model(data))


def test_several_dataloaders_give_a_list_per_dataloader_with_their_index():
    data, model = Indexed(), Net()

    class Shifted(Net):
        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            return super().predict_step(batch, batch_idx) + 100 * dataloader_idx

    model = Shifted()
    short = Indexed(4)
    out = _trainer().predict(model, [DataLoader(data, batch_size=3),
                                     DataLoader(short, batch_size=2)])
    assert [len(dl) for dl in out] == [3, 2]
    for got, want in zip(out[0], _expected(model, data, 3)):
        assert torch.equal(got, want)
    for got, want in zip(out[1], _expected(model, short, 2)):
        assert torch.equal(got, want + 100)


def test_several_dataloaders_need_a_dataloader_idx_argument():
    class NoIdx(Net):
        def predict_step(self, batch, batch_idx):
            return self(batch[0])

    data = Indexed()
    with pytest.raises(MisconfigurationException, match="dataloader_idx"):
        _trainer().predict(NoIdx(), [DataLoader(data), DataLoader(data)])


def test_predict_step_without_batch_idx_gets_the_batch_only():
    class BatchOnly(Net):
        def predict_step(self, batch):
            return self(batch[0])

    data = Indexed()
    out = _trainer().predict(BatchOnly(), DataLoader(data, batch_size=4))
    assert [o.shape[0] for o in out] == [4, 3]


def test_datamodule_and_module_predict_dataloaders():
    data = Indexed()

    class DM(pl.LightningDataModule):
        def predict_dataloader(self):
            return DataLoader(data, batch_size=2)

    class Own(Net):
        def predict_dataloader(self):
            return DataLoader(data, batch_size=5)

    trainer = _trainer()
    assert len(trainer.predict(Net(), datamodule=DM())) == 4
    assert len(trainer.predict(Net(), DM())) == 4  # a datamodule passed as the dataloaders
    assert len(trainer.predict(Own())) == 2
    assert len(trainer.predict(Own(), datamodule=DM())) == 4  # the datamodule's wins
    with pytest.raises(MisconfigurationException, match="predict_dataloader"):
        trainer.predict(Net())


def test_ckpt_path_predicts_with_the_checkpoint_weights(tmp_path):
    from ray_lit.storage.checkpoint_io import save_checkpoint

    data, model = Indexed(), Net()
    trainer = _trainer()
    path = str(tmp_path / "other.ckpt")
    other = Net()
    with torch.no_grad():
        other.layer.weight.fill_(0.5)
    save_checkpoint({"state_dict": other.state_dict()}, path)
    out = trainer.predict(model, DataLoader(data, batch_size=N), ckpt_path=path)
    assert torch.equal(out[0], _expected(other, data, N)[0])
    assert torch.equal(model.layer.weight, other.layer.weight)  # loaded into the model
    # without ckpt_path the model's current weights are used
    fresh = Net()
    out = trainer.predict(fresh, DataLoader(data, batch_size=N))
    assert torch.equal(out[0], _expected(fresh, data, N)[0])


def test_without_a_model_predict_uses_the_fitted_module_and_its_best_checkpoint(tmp_path):
    class Fit(Net):
        def training_step(self, batch, batch_idx):
            return self(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data, model = Indexed(), Fit()
    trainer = _trainer(max_epochs=1, default_root_dir=str(tmp_path))
    trainer.fit(model, DataLoader(data, batch_size=4))
    best = trainer.checkpoint_callback.best_model_path
    assert best
    with torch.no_grad():
        model.layer.weight.zero_()  # the best checkpoint, not these weights, predicts
    out = trainer.predict(dataloaders=DataLoader(data, batch_size=N))
    assert out[0].abs().sum() > 0
    assert torch.equal(model.layer.weight, torch.load(best, weights_only=False)
                       ["state_dict"]["layer.weight"])


class Writer(BasePredictionWriter):
    def __init__(self, interval: str) -> None:
        super().__init__(interval)
        self.batches: list[tuple] = []
        self.epochs: list[tuple] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch,
                           batch_idx, dataloader_idx):
        self.batches.append((list(batch_indices), batch[1].tolist(), batch_idx,
                             dataloader_idx, prediction.shape[0]))

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        self.epochs.append((predictions, batch_indices))


def test_writer_gets_the_dataset_indices_of_each_batch_even_shuffled():
    data = Indexed()
    writer = Writer("batch_and_epoch")
    loader = DataLoader(data, batch_size=3, sampler=RandomSampler(data))
    out = _trainer(callbacks=[writer]).predict(Net(), loader)
    for indices, held, _, dl_idx, rows in writer.batches:
        assert indices == held and rows == len(held) and dl_idx == 0  # the batch's samples
    assert sorted(i for b in writer.batches for i in b[0]) == list(range(N))
    assert [b[2] for b in writer.batches] == [0, 1, 2]
    (predictions, indices), = writer.epochs
    assert indices == [[b[0] for b in writer.batches]]  # per dataloader, per batch (2.x)
    assert all(torch.equal(p, o) for p, o in zip(predictions, out))


def test_return_predictions_false_returns_none_and_epoch_writer_still_gets_them():
    data = Indexed()
    writer = Writer("epoch")
    trainer = _trainer(callbacks=[writer])
    assert trainer.predict(Net(), DataLoader(data, batch_size=3),
                           return_predictions=False) is None
    assert writer.batches == []
    (predictions, indices), = writer.epochs
    assert len(predictions) == 3 and indices == [[[0, 1, 2], [3, 4, 5], [6]]]
    assert trainer.predict_loop.predictions == []  # nothing kept afterwards


def test_writer_interval_is_checked():
    with pytest.raises(MisconfigurationException, match="write_interval"):
        Writer("step")


def test_hook_order_matches_lightning_2():
    events: list[str] = []

    class Rec(pl.Callback):
        pass

    class Mod(Net):
        pass

    names = ["setup", "teardown", "on_predict_start", "on_predict_end",
             "on_predict_epoch_start", "on_predict_epoch_end", "on_predict_batch_start",
             "on_predict_batch_end"]
    for name in names:
        def cb_hook(self, trainer, pl_module, *args, _n=name):
            events.append(f"cb.{_n}")

        def m_hook(self, *args, _n=name):
            events.append(f"m.{_n}")

        setattr(Rec, name, cb_hook)
        setattr(Mod, name, m_hook)
    _trainer(callbacks=[Rec()]).predict(Mod(), DataLoader(Indexed(3), batch_size=2))
    batch = ["cb.on_predict_batch_start", "m.on_predict_batch_start",
             "cb.on_predict_batch_end", "m.on_predict_batch_end"]
    assert events == ["cb.setup", "m.setup", "cb.on_predict_start", "m.on_predict_start",
                      "cb.on_predict_epoch_start", "m.on_predict_epoch_start", *batch, *batch,
                      "cb.on_predict_epoch_end", "m.on_predict_epoch_end",
                      "cb.on_predict_end", "m.on_predict_end", "cb.teardown", "m.teardown"]


def test_self_log_in_predict_step_raises():
    class Logs(Net):
        def predict_step(self, batch, batch_idx):
            self.log("x", 1.0)

    with pytest.raises(MisconfigurationException, match="predict_step"):
        _trainer().predict(Logs(), DataLoader(Indexed()))


# --- sharding without padding ----------------------------------------------------------------
def test_two_ranks_get_disjoint_whole_batches_covering_the_loader():
    data = Indexed(11)
    loader = DataLoader(data, batch_size=2)
    seen = {}
    for rank in (0, 1):
        shard, batches = prepare_predict_loader(loader, world_rank=rank, world_size=2, seed=0)
        held = [b[1].tolist() for b in shard]
        assert len(shard) == len(held)
        seen[rank] = [(p, ix) for p, ix in batches.seen]
        assert [ix for _, ix in seen[rank]] == held  # recorded = delivered
        assert batches.total == 6
    assert [p for p, _ in seen[0]] == [0, 2, 4] and [p for p, _ in seen[1]] == [1, 3, 5]
    every = sorted(i for r in (0, 1) for _, ix in seen[r] for i in ix)
    assert every == list(range(11))  # no padded repeat of sample 0


def test_shuffled_predict_loader_is_the_same_order_on_every_rank():
    data = Indexed(10)
    loader = DataLoader(data, batch_size=3, shuffle=True)
    union = []
    for rank in (0, 1):
        shard, batches = prepare_predict_loader(loader, world_rank=rank, world_size=2, seed=7)
        union += [i for b in shard for i in b[1].tolist()]
    assert sorted(union) == list(range(10))


def test_batch_size_none_and_unshardable_loaders():
    data = Indexed(5)
    shard, batches = prepare_predict_loader(DataLoader(data, batch_size=None), world_rank=1,
                                            world_size=2, seed=0)
    assert [int(b[1]) for b in shard] == [1, 3] and batches.seen == [(1, [1]), (3, [3])]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    stream = DataLoader(Stream())
    assert prepare_predict_loader(stream, world_rank=0, world_size=2, seed=0) == (stream, None)
    batches = [[0, 1], [2]]
    assert prepare_predict_loader(batches, world_rank=0, world_size=2, seed=0) == (batches, None)
    assert len(PredictBatches([[0], [1], [2]], 2, 1)) == 1


# --- streaming: the worker's outbox and the driver's collector -------------------------------
def _chunk(rank: int, batch_idx: int, position: int | None, value, size: int = 0,
           dl: int = 0) -> PredictionChunk:
    payload = cloudpickle.dumps((value, b"x" * size))
    return PredictionChunk(rank=rank, dataloader_idx=dl, batch_idx=batch_idx,
                           indices=(position or 0,), payload=payload, position=position)


def test_outbox_hands_over_a_bounded_share_per_poll():
    outbox = ChunkOutbox(capacity_bytes=10_000, per_poll_bytes=2_500)
    for i in range(6):
        outbox.put(_chunk(0, i, i, i, size=1000))
    first = outbox.take()
    assert [c.batch_idx for c in first] == [0, 1]  # two chunks of ~1 KB fit in 2.5 KB
    assert outbox.pending()
    rest = []
    while outbox.pending():
        rest += outbox.take()
    assert [c.batch_idx for c in rest] == [2, 3, 4, 5]
    big = _chunk(0, 9, 9, 9, size=5000)
    outbox.put(big)
    assert outbox.take() == (big,)  # one chunk always goes, however large


def test_outbox_makes_a_fast_loop_wait_for_the_polls():
    woken = []
    outbox = ChunkOutbox(capacity_bytes=3000, per_poll_bytes=10_000,
                         notify=lambda: woken.append(1))
    done = threading.Event()

    def loop():
        for i in range(5):
            outbox.put(_chunk(0, i, i, i, size=1000))
        outbox.drain()
        done.set()

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(0.3)
    assert not done.is_set() and woken  # full: the loop waits and asks for a poll
    taken = []
    while not done.wait(0.05):
        taken += outbox.take()
    thread.join()
    assert [c.batch_idx for c in taken] == [0, 1, 2, 3, 4]


def test_outbox_wait_ends_when_the_attempt_is_cancelled():
    outbox = ChunkOutbox(capacity_bytes=10, cancelled=lambda: True)
    outbox.put(_chunk(0, 0, 0, 0))
    with pytest.raises(RuntimeError, match="ended this attempt"):
        outbox.put(_chunk(0, 1, 1, 1))


def test_collector_orders_by_position_and_keeps_a_retry_once():
    collector = PredictionCollector()
    collector.add([_chunk(1, 0, 1, "b1")])  # each status is one rank's
    collector.add([_chunk(0, 1, 2, "b2"), _chunk(0, 0, 0, "b0", dl=1)])
    collector.add([_chunk(0, 0, 0, "b0")])
    collector.add([_chunk(1, 0, 1, "b1")])  # a retried attempt's batch replaces the first
    out = collector.assemble([3, 1])
    assert [[v for v, _ in dl] for dl in out] == [["b0", "b1", "b2"], ["b0"]]
    assert collector.chunks_received == 5 and collector.statuses_with_chunks == {1: 2, 0: 2}


def test_collector_raises_on_a_lost_batch_and_orders_unsharded_by_rank():
    collector = PredictionCollector()
    collector.add([_chunk(0, 0, 0, "a"), _chunk(0, 1, 2, "c")])
    with pytest.raises(RuntimeError, match=r"batches \[1\]"):
        collector.assemble([3])
    collector = PredictionCollector()
    collector.add([_chunk(1, 0, None, "r1b0"), _chunk(0, 1, None, "r0b1")])
    collector.add([_chunk(0, 0, None, "r0b0")])
    assert [v for v, _ in collector.assemble([None])] == ["r0b0", "r0b1", "r1b0"]


def test_the_controller_hook_feeds_the_collector_only_when_there_is_one():
    class Controller:
        pass

    status = WorkerStatus(WorkerState.RUNNING, predictions=(_chunk(0, 0, 0, "v"),))
    controller = Controller()
    receive_predictions(controller, status)  # no collector: nothing happens
    controller.prediction_collector = PredictionCollector()
    receive_predictions(controller, status)
    receive_predictions(controller, WorkerStatus(WorkerState.RUNNING))
    assert controller.prediction_collector.statuses_with_chunks == {0: 1}


def test_a_worker_poll_carries_a_share_of_the_chunks_and_the_rest_comes_at_once():
    import signal

    from ray_lit.worker.actor import Worker

    previous = signal.getsignal(signal.SIGTERM)
    worker = Worker()  # on the main thread it installs its SIGTERM handler: put ours back
    signal.signal(signal.SIGTERM, previous)
    outbox = ChunkOutbox(per_poll_bytes=2_500)
    worker._predictions = outbox
    for i in range(3):
        outbox.put(_chunk(0, i, i, i, size=1000))
    first = worker.poll()
    assert [c.batch_idx for c in first.predictions] == [0, 1]
    start = time.monotonic()
    second = worker.poll(wait_s=30)  # chunks left: the next poll does not wait
    assert time.monotonic() - start < 10
    assert [c.batch_idx for c in second.predictions] == [2]
    assert worker.poll().predictions == ()
    worker._reset()
    assert worker._predictions is None


def test_a_loader_that_cannot_be_rebuilt_still_predicts_in_process_without_indices():
    class Odd(DataLoader):
        def __init__(self, data, secret):  # ``secret`` is not kept: cannot be rebuilt
            super().__init__(data, batch_size=4)

    writer = Writer("batch")
    with pytest.warns(UserWarning, match="batch indices"):
        out = _trainer(callbacks=[writer]).predict(Net(), Odd(Indexed(), 1))
    assert [o.shape[0] for o in out] == [4, 3]
    assert [b[0] for b in writer.batches] == [[], []]
    with pytest.raises(MisconfigurationException, match="secret"):
        prepare_predict_loader(Odd(Indexed(), 1), world_rank=0, world_size=2, seed=0)
