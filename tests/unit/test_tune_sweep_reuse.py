"""``ray_lit.tune.sweep`` asks Tune for warm trials unless the user says otherwise (issue 17):
the TuneConfig it builds, seen through a recording stand-in for ``tune.Tuner`` (no Ray)."""

from __future__ import annotations

from typing import Any

import pytest
from ray import tune

import ray_lit as pl
from ray_lit.errors import MisconfigurationException
from ray_lit.tune import sweep


class RecordingTuner:
    """Stands in for ``tune.Tuner``: keeps what ``sweep`` built, runs nothing."""

    built: list[RecordingTuner] = []

    def __init__(self, trainable: Any, *, param_space: dict, tune_config: Any,
                 run_config: Any) -> None:
        self.tune_config = tune_config
        RecordingTuner.built.append(self)

    def fit(self) -> str:
        return "results"


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[RecordingTuner]:
    RecordingTuner.built = []
    monkeypatch.setattr(tune, "Tuner", RecordingTuner)
    monkeypatch.setattr("ray_lit.driver.launch.ensure_ray", lambda: None)
    return RecordingTuner.built


def _sweep(**kwargs: Any) -> Any:
    return sweep(lambda config: pl.LightningModule(), {"lr": 0.1}, metric="loss",
                 num_workers=2, **kwargs)


def test_a_sweep_reuses_trial_actors_by_default(recorded):
    assert _sweep() == "results"
    assert recorded[0].tune_config.reuse_actors is True


def test_an_explicit_reuse_actors_false_wins(recorded):
    _sweep(reuse_actors=False)
    assert recorded[0].tune_config.reuse_actors is False


def test_reuse_actors_that_is_not_a_bool_is_refused_naming_the_option(recorded):
    with pytest.raises(MisconfigurationException, match="reuse_actors"):
        _sweep(reuse_actors="yes")
    assert not recorded  # refused before Tune was asked for anything
