"""Run-scoped names: a generated run name is unique (two Trainers started in the same second
never share a run directory; the second would resume the first's checkpoints with
``resume="auto"``), and the run's options of ``python -m ray_lit`` speak the Trainer's names."""

from __future__ import annotations

import ray_lit as pl
from ray_lit.driver.launch import _run_uri


def test_generated_run_names_differ_within_one_second(tmp_path):
    uris = {_run_uri(pl.Trainer(num_workers=2, storage_path=str(tmp_path))) for _ in range(20)}
    assert len(uris) == 20
    named = pl.Trainer(num_workers=2, storage_path=str(tmp_path), run_name="mine")
    assert _run_uri(named) == f"{tmp_path}/mine"  # a given name is kept: a rerun continues it


def test_the_runs_options_speak_the_same_names_as_the_trainer():
    """``python -m ray_lit --trainer-options '{"progress_bar_refresh_rate": 0}'``: a 0.9 alias
    in the run's options is translated like one passed to ``Trainer``, a typo is named."""
    import pytest

    from ray_lit.errors import MisconfigurationException

    pl.compat.install(progress_bar_refresh_rate=0, row_log_interval=1)
    try:
        trainer = pl.Trainer()
        assert trainer.config.enable_progress_bar is False
        assert trainer.config.log_every_n_steps == 1
    finally:
        pl.compat.uninstall()
    pl.compat.install(max_epoch=1)
    try:
        with pytest.raises(MisconfigurationException, match="'max_epoch'.*'max_epochs'"):
            pl.Trainer()
    finally:
        pl.compat.uninstall()
