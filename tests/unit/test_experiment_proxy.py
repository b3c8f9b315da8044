"""``self.logger.experiment`` inside a Ray worker (issue 15), without Ray.

Rank 0's ``ExperimentProxy`` records each call into the batched metric stream; the driver's
``DriverSink`` applies it to the real TensorBoard writer on replay. Other ranks get a no-op.
"""

from __future__ import annotations

import pickle

import cloudpickle
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from ray_lit.driver.reporting import DriverSink, replay
from ray_lit.loggers import TensorBoardLogger
from ray_lit.loop.reporting import NullSink, RecordingSink
from ray_lit.worker.logger_proxy import ExperimentProxy, LoggerProxy, NoOpExperiment


def _rank_proxy(logger, sink, index: int = 0) -> LoggerProxy:
    """What a worker's ``trainer.loggers`` holds: the driver logger's proxy, attached to the
    rank's sink (as ``worker.job`` does)."""
    proxy = cloudpickle.loads(cloudpickle.dumps(LoggerProxy.of(logger, index)))
    proxy.sink = sink
    return proxy


def _over_the_wire(events):
    """The drained events as the driver gets them (pickled by Ray on the way)."""
    return pickle.loads(pickle.dumps(events))


def _accumulator(log_dir: str) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(log_dir, size_guidance={
        event_accumulator.IMAGES: 0, event_accumulator.HISTOGRAMS: 0,
        event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def test_rank0_calls_are_replayed_into_the_driver_tensorboard(tmp_path):
    driver_logger = TensorBoardLogger(str(tmp_path))
    sink = RecordingSink()
    proxy = _rank_proxy(driver_logger, sink)
    weights = torch.arange(100, dtype=torch.float32, requires_grad=True)
    experiment = proxy.experiment
    assert isinstance(experiment, ExperimentProxy)
    proxy.log_metrics({"loss": 1.5}, step=3)
    experiment.add_image("img", torch.ones(3, 4, 5) * 0.5, global_step=3)
    experiment.add_histogram("w", weights, 3)
    with torch.no_grad():
        weights.mul_(100)  # an optimizer step after the call must not change what was logged
    experiment.add_text("note", "hello from rank 0", global_step=4)
    experiment.add_scalar("custom", torch.tensor(2.5), 4)
    experiment.add_images("batch", np.zeros((2, 3, 4, 4), dtype=np.float32), 5)
    proxy.log_metrics({"loss": 0.5}, step=4)
    events = _over_the_wire(sink.drain())
    # one stream, in call order: metrics and experiment calls interleaved as they were made
    assert [kind for kind, _ in events] == ["log_metrics"] + ["experiment_call"] * 5 + [
        "log_metrics"]
    replay(events, DriverSink([driver_logger]))
    driver_logger.finalize("success")

    acc = _accumulator(driver_logger.log_dir)
    images = acc.Images("img")
    assert [(e.step, e.width, e.height) for e in images] == [(3, 5, 4)]
    assert [e.step for e in acc.Images("batch")] == [5]
    (hist,) = acc.Histograms("w")
    assert hist.step == 3
    assert (hist.histogram_value.min, hist.histogram_value.max) == (0.0, 99.0)
    assert hist.histogram_value.num == 100
    (text,) = acc.Tensors("note/text_summary")
    assert text.step == 4 and text.tensor_proto.string_val == [b"hello from rank 0"]
    assert [(e.step, e.value) for e in acc.Scalars("custom")] == [(4, 2.5)]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(3, 1.5), (4, 0.5)]


def test_add_figure_is_rendered_in_the_worker_and_closed(tmp_path):
    import matplotlib  # the dev extra installs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    driver_logger = TensorBoardLogger(str(tmp_path))
    sink = RecordingSink()
    experiment = _rank_proxy(driver_logger, sink).experiment
    figure = plt.figure(figsize=(2, 1), dpi=50)
    plt.plot([0, 1], [1, 0])
    experiment.add_figure("fig", figure, global_step=7)
    assert not plt.fignum_exists(figure.number)  # close=True closed the worker's figure
    kept = plt.figure(figsize=(2, 1), dpi=50)
    experiment.add_figure("figs", [kept, kept], 8, close=False)
    assert plt.fignum_exists(kept.number)
    plt.close(kept)
    replay(_over_the_wire(sink.drain()), DriverSink([driver_logger]))
    driver_logger.finalize("success")

    acc = _accumulator(driver_logger.log_dir)
    assert [(e.step, e.width, e.height) for e in acc.Images("fig")] == [(7, 100, 50)]
    assert [e.step for e in acc.Images("figs")] == [8]


def test_calls_reach_the_logger_they_were_made_on(tmp_path):
    first, second = TensorBoardLogger(str(tmp_path), name="a"), TensorBoardLogger(
        str(tmp_path), name="b")
    sink = RecordingSink()
    _rank_proxy(second, sink, index=1).experiment.add_scalar("only_b", 1.0, 0)
    first.log_metrics({"only_a": 1.0}, 0)
    replay(_over_the_wire(sink.drain()), DriverSink([first, second]))
    first.finalize("success")
    second.finalize("success")
    assert "only_b" in _accumulator(second.log_dir).Tags()["scalars"]
    assert "only_b" not in _accumulator(first.log_dir).Tags()["scalars"]


def test_other_ranks_get_a_no_op_experiment(tmp_path):
    sink = NullSink()
    proxy = _rank_proxy(TensorBoardLogger(str(tmp_path)), sink)
    experiment = proxy.experiment
    assert isinstance(experiment, NoOpExperiment)
    assert experiment.add_image("img", torch.ones(3, 2, 2)) is None
    experiment.add_histogram("w", torch.zeros(4), 0)
    experiment.anything_at_all(1, key=2)
    experiment["key"].log({"x": 1})  # wandb-style item access too
    assert not (tmp_path / "lightning_logs").exists()  # nothing was created or written


def test_value_attributes_and_errors(tmp_path):
    driver_logger = TensorBoardLogger(str(tmp_path))
    sink = RecordingSink()
    experiment = _rank_proxy(driver_logger, sink).experiment
    # the directory the driver's writer writes to, without opening it in the worker
    assert experiment.log_dir == experiment.logdir == experiment.get_logdir() == \
        driver_logger.log_dir
    with pytest.raises(AttributeError, match="file_writer lives in the driver process"):
        _ = experiment.file_writer
    with pytest.raises(TypeError, match=r"add_text\(\.\.\.\) in a Ray worker.*picklable"):
        experiment.add_text("bad", _Unpicklable())
    assert sink.drain() == []


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("cannot pickle _Unpicklable")


def test_a_call_that_fails_on_the_driver_warns_and_the_stream_goes_on(tmp_path):
    driver_logger = TensorBoardLogger(str(tmp_path))
    sink = RecordingSink()
    proxy = _rank_proxy(driver_logger, sink)
    proxy.experiment.add_imagee("typo", torch.zeros(3, 2, 2))
    proxy.log_metrics({"after": 1.0}, step=0)
    with pytest.warns(RuntimeWarning, match=r"experiment\.add_imagee\(\.\.\.\).*TensorBoard"):
        replay(_over_the_wire(sink.drain()), DriverSink([driver_logger]))
    driver_logger.finalize("success")
    assert "after" in _accumulator(driver_logger.log_dir).Tags()["scalars"]
