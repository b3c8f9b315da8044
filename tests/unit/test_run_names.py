"""A generated run name is unique: two Trainers started in the same second never share a run
directory (the second would resume the first's checkpoints with ``resume="auto"``)."""

from __future__ import annotations

import ray_lit as pl
from ray_lit.driver.launch import _run_uri


def test_generated_run_names_differ_within_one_second(tmp_path):
    uris = {_run_uri(pl.Trainer(num_workers=2, storage_path=str(tmp_path))) for _ in range(20)}
    assert len(uris) == 20
    named = pl.Trainer(num_workers=2, storage_path=str(tmp_path), run_name="mine")
    assert _run_uri(named) == f"{tmp_path}/mine"  # a given name is kept: a rerun continues it
