"""The bookkeeping of ``benchmarks/chaos_mix.py`` (no Ray): the fault plan, how a rank carries
it out, and how recovery and steps redone are attributed to each fault."""

from __future__ import annotations

import json
import os
import random
import sys
from collections import Counter
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import chaos_mix  # noqa: E402
from chaos_driver import ChaosNet  # noqa: E402


def test_the_plan_draws_all_six_kinds_about_equally_at_distinct_steps():
    plan = chaos_mix.make_plan(random.Random(0), 50, 256, 4, need_node=False)
    counts = Counter(kind for _, _, kind in plan)
    assert set(counts) == set(chaos_mix.KINDS)
    assert max(counts.values()) - min(counts.values()) <= 1
    steps = [step for _, step, _ in plan]
    assert steps == sorted(set(steps)) and steps[0] >= 2 and steps[-1] < 254
    assert {rank for rank, _, _ in plan} <= set(range(4))


def test_an_elastic_plan_always_removes_a_node_so_the_group_shrinks():
    for seed in range(30):
        plan = chaos_mix.make_plan(random.Random(seed), 2, 64, 4, need_node=True)
        assert "node" in {kind for _, _, kind in plan}
    only = chaos_mix.make_plan(random.Random(1), 3, 64, 4, need_node=True, kinds=("hang",))
    assert {kind for _, _, kind in only} == {"hang"}


def _at(module: ChaosNet, rank: int, step: int, world_size: int) -> None:
    module.trainer = SimpleNamespace(global_rank=rank, global_step=step, world_size=world_size)


def test_faults_fire_once_in_plan_order_on_the_rank_modulo_the_world_size(tmp_path):
    module = ChaosNet(str(tmp_path), [(3, 5, "outage"), (0, 6, "outage")])
    _at(module, 0, 9, 2)  # fault 1's rank and step, but fault 0 has not fired yet
    module._maybe_fault()
    assert not os.listdir(tmp_path)
    _at(module, 1, 5, 2)  # rank 3 of the plan is rank 1 of a group of 2
    module._maybe_fault()
    first = json.loads((tmp_path / "fault-000.json").read_text())
    assert (first["rank"], first["step"], first["world_size"]) == (1, 5, 2)
    module._maybe_fault()  # once only
    assert sorted(os.listdir(tmp_path)) == ["fault-000.json"]
    _at(module, 0, 7, 2)  # the first step >= 6 that rank 0 reaches
    module._maybe_fault()
    second = json.loads((tmp_path / "fault-001.json").read_text())
    assert (second["step"], second["planned_step"]) == (7, 6)


def test_each_rank_logs_the_first_step_of_each_attempt_once(tmp_path):
    module = ChaosNet(str(tmp_path), [])
    _at(module, 1, 12, 4)
    batch = (torch.zeros(2, 16), torch.zeros(2, 1))
    module.on_train_start()
    module.training_step(batch, 0)
    module.training_step(batch, 1)
    module.on_train_start()  # the next attempt
    module.training_step(batch, 0)
    lines = [json.loads(x) for x in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert [(r["rank"], r["step"], r["world_size"]) for r in lines] == [(1, 12, 4)] * 2


def _attempt(start: float, step: int, world_size: int = 4) -> dict:
    return {"time": start + 0.5, "attempt_start": start, "step": step, "rank": 0,
            "world_size": world_size}


def test_recovery_and_steps_redone_are_counted_from_the_injection_to_the_next_attempt():
    phase = chaos_mix.Phase("elastic", [2, 4], 0.0, plan=[])
    phase.events = [
        {"kind": "exit", "injected": 100.0, "step": 10},
        {"kind": "node", "injected": 200.0, "step": 30},
        {"kind": "outage", "injected": 300.0, "step": 50},  # no restart
        {"kind": "outage", "injected": 400.0, "step": 70},  # a restart nothing else explains
    ]
    phase.outages = [(300.0, 304.0), (400.0, 404.0)]
    phase.growths = [250.0]
    phase.attempts = [_attempt(0.0, 0), _attempt(105.0, 8), _attempt(210.0, 28, 2),
                      _attempt(260.0, 40), _attempt(403.0, 68)]
    commits = chaos_mix.CommitReport(seen_at=[(302.0, "s3://b/runs/elastic/step-1"),
                                              (305.5, "s3://b/runs/elastic/step-2"),
                                              (305.0, "s3://b/runs/fixed/step-9")])
    chaos_mix.measure(phase, commits)
    exit_, node, quiet, noisy = phase.events
    assert (exit_["recovery_s"], exit_["redone"]) == (5.5, 2)
    assert (node["recovery_s"], node["redone"], node["next_world_size"]) == (10.5, 2, 2)
    assert (quiet["restart"], quiet["redone"], quiet["recovery_s"]) == (False, 0, 1.5)
    assert (noisy["restart"], noisy["redone"]) == (True, 2)
    assert phase.growth_s == [10.5]
    # 5 attempts: the first, 2 process faults, 1 growth and the outage's restart
    assert chaos_mix.unplanned_restarts(phase) == 1


def test_the_ranks_of_one_attempt_count_once():
    ranks = [dict(_attempt(10.0 + 0.3 * r, 4), rank=r) for r in range(4)]
    assert chaos_mix.attempt_starts(ranks + [_attempt(30.0, 8)]) == [10.0, 30.0]
