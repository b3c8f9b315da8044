"""ProgressBar driven through the trainer's API: plain lines, tqdm bars, disable, pickling."""

from __future__ import annotations

import pickle

import cloudpickle
import pytest

from ray_lit.callbacks import progress
from ray_lit.callbacks.progress import ProgressBar, TQDMProgressBar, _format_num


def _fit_epoch(bar: ProgressBar, epoch: int, n: int = 4, val: bool = True) -> None:
    bar.start_stage("train", n, epoch, 3)
    for i in range(1, n + 1):
        bar.update("train", i, {"loss": "0.123", "v_num": 0})
    if val:
        bar.start_stage("validate", 2, epoch, 3)
        bar.update("validate", 2, {"loss": "0.123", "v_num": 0, "val_loss": 0.2})
        bar.end_stage("validate")
    bar.end_stage("train")


@pytest.fixture
def mode(monkeypatch):
    def set_mode(name: str) -> None:
        monkeypatch.setattr(progress, "_display_mode", lambda: name)
    return set_mode


def test_alias():
    assert TQDMProgressBar is ProgressBar


def test_format_like_lightning():
    assert _format_num(0.123456) == "0.123"
    assert _format_num(0.2) == "0.200"
    assert _format_num("0.1") == "0.100"
    assert _format_num(3) == "3"
    assert _format_num(12345) == "12345"
    assert _format_num(1.5e-7) == "1.5e-7"
    assert _format_num("abc") == "abc"


def test_plain_mode_prints_one_line_per_epoch(capsys, mode):
    mode("plain")
    bar = ProgressBar()
    bar.on_run_start("fit")
    bar.start_stage("sanity_check", 2, 0, 3)
    bar.update("sanity_check", 2, {})
    bar.end_stage("sanity_check")
    _fit_epoch(bar, 0)
    _fit_epoch(bar, 1, val=False)
    bar.on_run_end()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2, out  # no sanity line, no separate validation line
    assert lines[0].startswith("Epoch 0: 4/4 [")
    assert "it/s]" in lines[0] or "s/it]" in lines[0]
    assert lines[0].endswith("loss=0.123 v_num=0 val_loss=0.200")
    assert lines[1].startswith("Epoch 1: 4/4 [") and lines[1].endswith("loss=0.123 v_num=0")
    assert "\r" not in out + err  # no carriage-return redraws in logs


def test_plain_mode_validation_outside_an_epoch_prints_its_line(capsys, mode):
    mode("plain")
    bar = ProgressBar()
    bar.on_run_start("fit")
    _fit_epoch(bar, 0, val=False)
    bar.start_stage("validate", 2, 0, 3)  # after the epoch's bar ended: nothing to merge into
    bar.update("validate", 2, {"val_loss": 0.2})
    bar.end_stage("validate")
    bar.on_run_end()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("Validation: 2/2 [") and lines[1].endswith("val_loss=0.200")


def test_plain_mode_eval_runs_and_unknown_total(capsys, mode):
    mode("plain")
    bar = ProgressBar()
    bar.on_run_start("test")
    bar.start_stage("test", 5, 0, None)
    bar.update("test", 5, {"v_num": 1})
    bar.end_stage("test")
    bar.on_run_start("fit")
    bar.start_stage("train", None, 2, None)
    bar.update("train", 7, {})
    bar.end_stage("train")
    bar.on_run_end()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Testing: 5/5 [")
    assert lines[1].startswith("Epoch 2: 7 [")


def test_real_display_mode_is_plain_under_capture(capsys):
    assert progress._display_mode() == "plain"  # captured stderr is not a TTY


def test_disabled_prints_nothing(capsys, mode):
    for make in (lambda: ProgressBar(refresh_rate=0), lambda: ProgressBar()):
        for name in ("plain", "terminal"):
            mode(name)
            bar = make()
            if bar.is_enabled:
                bar.disable()
            assert not bar.is_enabled
            bar.on_run_start("fit")
            _fit_epoch(bar, 0)
            bar.on_run_end()
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    bar.enable()
    assert bar.is_enabled


def test_terminal_mode_draws_tqdm_bars(capsys, mode):
    mode("terminal")
    bar = ProgressBar()
    bar.on_run_start("fit")
    bar.start_stage("train", 4, 0, 3)
    bar.update("train", 2, {"loss": 0.5})
    main = bar._bars["train"]
    assert main.n == 2 and main.desc.startswith("Epoch 0")
    bar.start_stage("validate", 2, 0, 3)
    assert bar._bars["validate"].pos in (1, -1)  # nested under the main bar
    bar.update("validate", 2, {"val_loss": 0.25})
    bar.end_stage("validate")
    assert "validate" not in bar._bars
    assert "val_loss=0.250" in main.postfix
    bar.end_stage("train")
    bar.start_stage("train", 4, 1, 3)
    assert bar._bars["train"] is main and main.n == 0  # one bar reused (leave=False)
    assert main.desc.startswith("Epoch 1")
    bar.on_run_end()
    assert bar._bars == {}
    out, err = capsys.readouterr()
    assert "Epoch 0" in err and out == ""  # bars on stderr, no plain lines


def test_terminal_leave_keeps_one_bar_per_epoch(capsys, mode):
    mode("terminal")
    bar = ProgressBar(leave=True)
    bar.on_run_start("fit")
    bar.start_stage("train", 2, 0, 2)
    first = bar._bars["train"]
    bar.end_stage("train")
    bar.start_stage("train", 2, 1, 2)
    assert bar._bars["train"] is not first
    bar.on_run_end()


def test_refresh_rate_respected(capsys, mode):
    mode("terminal")
    bar = ProgressBar(refresh_rate=10)
    bar.on_run_start("fit")
    bar.start_stage("train", 25, 0, 1)
    draws = []
    main = bar._bars["train"]
    original = main.refresh
    main.refresh = lambda *a, **k: (draws.append(main.n), original(*a, **k))
    for i in range(1, 26):
        bar.update("train", i, {})
    assert draws == [10, 20, 25]  # multiples of 10, and the end of the stage
    bar.end_stage("train")
    bar.start_stage("train", 40, 1, 2)
    draws.clear()
    for i in (3, 14, 15, 31):  # updates replayed from workers come at arbitrary counts
        bar.update("train", i, {})
    assert draws == [14, 31]
    bar.on_run_end()


def test_pickle_round_trip_drops_bars(capsys, mode):
    mode("terminal")
    bar = ProgressBar(refresh_rate=5, process_position=1)
    bar.on_run_start("fit")
    bar.start_stage("train", 10, 0, 1)
    bar.update("train", 5, {"loss": 1.0})
    for dumps in (pickle.dumps, cloudpickle.dumps):
        copy = pickle.loads(dumps(bar))
        assert copy._bars == {} and copy.refresh_rate == 5 and copy.process_position == 1
        copy.on_run_start("fit")  # recreates bars lazily
        copy.start_stage("train", 3, 0, 1)
        copy.update("train", 3, {})
        copy.on_run_end()
    assert bar._bars  # the original keeps its bar
    bar.on_run_end()


def test_print_goes_around_bars(capsys, mode):
    mode("plain")
    bar = ProgressBar()
    bar.print("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"
