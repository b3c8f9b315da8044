"""In-memory peer snapshots with ``strategy="fsdp"`` on Ray workers (issue 16, item 4).

Each rank keeps its own shards and its ring neighbour's in host memory
(``checkpoint.shard_ring``). At two workers a single lost rank is restored from the survivor's
memory, exactly (``torch.equal`` with an uninterrupted FSDP run); at three and four, from two
survivors' memory together (rank 1's shards are with rank 2, rank 0's with rank 0), exactly too;
two ring-adjacent ranks lost leave a rank's shards with nobody (storage, and the driver says why);
with both ranks lost there is no survivor, and the run continues from the latest committed
sharded checkpoint instead.
"""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ray_lit
import ray_lit as pl

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class DropoutNet(pl.LightningModule):
    """Dropout + Adam + a scheduler + a shuffled loader: exact restore needs every piece."""

    def __init__(self, kill_marker: str = "", kill_ranks: tuple[int, ...] = (1,),
                 step_sleep_s: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(3)
        # 33 and 17 rows: the two ranks' shards differ in size (uneven chunks are put back)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.3), torch.nn.Linear(33, 17),
                                       torch.nn.ReLU(), torch.nn.Linear(17, 1))
        self.kill_marker = kill_marker
        self.kill_ranks = kill_ranks
        self.step_sleep_s = step_sleep_s

    def training_step(self, batch, batch_idx):
        marker = f"{self.kill_marker}.{self.global_rank}"
        if (self.kill_marker and self.global_rank in self.kill_ranks and self.global_step == 5
                and not os.path.exists(marker)):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies mid-epoch: no exception, no cleanup
        time.sleep(self.step_sleep_s)  # time for the snapshot's own parts to reach the driver
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


def _data(batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(96, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size,
                      shuffle=True)


def _fit(tmp_path, name: str, checkpoint_every_n_steps: int | None = None,
         snapshot_every_n_steps: int | None = None, num_workers: int = 2,
         batch_size: int = 8, **extra):
    pl.seed_everything(11)
    model = DropoutNet(**extra)
    trainer = ray_lit.fit(model, _data(batch_size), num_workers=num_workers, max_epochs=2,
                          strategy="fsdp",
                          max_failures=2, storage_path=str(tmp_path / "runs"), run_name=name,
                          checkpoint_every_n_steps=checkpoint_every_n_steps,
                          snapshot_every_n_steps=snapshot_every_n_steps,
                          enable_progress_bar=False, enable_model_summary=False, logger=False,
                          enable_checkpointing=False)
    return model, trainer


@pytest.fixture(autouse=True)
def patient_node_probe(monkeypatch):
    """After a lost worker the controller probes its node with a fresh Ray task (2 s) to tell
    a dead process from a lost node; on a loaded 2-core machine starting that task's process
    alone can take longer, and a live node judged lost has its survivors killed unasked (no
    snapshot is exported, storage is used). These tests are about the restore, so the probe
    waits longer."""
    from ray_lit.driver.cluster_view import ClusterView

    probe = ClusterView.unreachable
    monkeypatch.setattr(ClusterView, "unreachable",
                        lambda self, node_ids, timeout_s=2.0: probe(self, node_ids, 30.0))


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """An uninterrupted FSDP run: no snapshots, storage checkpoints at epoch ends only."""
    model, trainer = _fit(tmp_path_factory.mktemp("fsdp_peer_ref"), "reference")
    assert trainer.num_restarts == 0 and trainer.global_step == 12
    return model


def test_a_lost_rank_is_restored_from_its_neighbours_memory_exactly(reference, tmp_path,
                                                                    capsys) -> None:
    marker = str(tmp_path / "killed")
    # storage checkpoints only at epoch ends (step 6); snapshots every 2 steps. Rank 1 dies at
    # step 5: rank 0 holds its own shards and rank 1's of step 4, the driver both ranks' own
    # parts (RNG, loop and sampler position, rank 0's scheduler and buffers)
    model, trainer = _fit(tmp_path, "memory", snapshot_every_n_steps=2, kill_marker=marker,
                          step_sleep_s=0.15)
    assert os.path.exists(marker + ".1"), "the kill did not happen"
    assert trainer.num_restarts == 1
    assert trainer.world_size_history == [2, 2]
    out = capsys.readouterr().out
    assert ("restoring from step 4 from a surviving worker's memory, no checkpoint committed "
            "yet") in out
    assert trainer.global_step == 12
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_both_ranks_lost_falls_back_to_the_committed_sharded_checkpoint(reference, tmp_path,
                                                                        capsys) -> None:
    marker = str(tmp_path / "killed")
    # a sharded checkpoint every 3 steps, snapshots every 2: both ranks die at step 5, so no
    # survivor holds the snapshot of step 4 and the commit of step 3 is restored
    model, trainer = _fit(tmp_path, "storage", checkpoint_every_n_steps=3,
                          snapshot_every_n_steps=2, kill_marker=marker, kill_ranks=(0, 1),
                          step_sleep_s=0.15)
    assert os.path.exists(marker + ".0") and os.path.exists(marker + ".1")
    assert trainer.num_restarts == 1
    out = capsys.readouterr().out
    assert "surviving worker's memory" not in out
    assert "restoring from step-3" in out or "(step 3," in out, out
    assert trainer.global_step == 12
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key



BATCH = {3: 4, 4: 3}  # samples a batch at 3 and 4 workers: 8 steps an epoch, 16 in all


@pytest.fixture(scope="module")
def references(ray_cluster, tmp_path_factory):
    """Uninterrupted FSDP runs at 3 and 4 workers (made when first asked for)."""
    made: dict[int, torch.nn.Module] = {}

    def reference(world: int) -> torch.nn.Module:
        if world not in made:
            model, trainer = _fit(tmp_path_factory.mktemp(f"fsdp_peer_ref{world}"),
                                  f"reference{world}", num_workers=world,
                                  batch_size=BATCH[world])
            assert trainer.num_restarts == 0 and trainer.global_step == 16
            made[world] = model
        return made[world]

    return reference


@pytest.mark.parametrize("world", [3, 4])
def test_one_lost_rank_of_several_is_restored_from_two_survivors_memory_exactly(
        world, references, tmp_path, capsys) -> None:
    # step 5 is mid-epoch and no storage checkpoint is committed yet (epoch ends only). Rank 1
    # dies at step 5; its shards of the step-4 snapshot are with rank 2, rank 0's own with
    # rank 0 (at 4 workers rank 3's with ranks 0 and 3): the driver exports from ranks 0, 2
    marker = str(tmp_path / "killed")
    model, trainer = _fit(tmp_path, f"memory{world}", snapshot_every_n_steps=2,
                          kill_marker=marker, step_sleep_s=0.15, num_workers=world,
                          batch_size=BATCH[world])
    assert os.path.exists(marker + ".1"), "the kill did not happen"
    assert trainer.num_restarts == 1 and trainer.world_size_history == [world, world]
    out = capsys.readouterr().out
    assert ("restoring from step 4 from 2 surviving workers' memory, no checkpoint committed "
            f"yet (FSDP shards of all {world} ranks)") in out, out
    assert trainer.global_step == 16
    for key, value in references(world).state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_two_adjacent_lost_ranks_of_three_fall_back_to_storage_and_say_why(
        references, tmp_path, capsys) -> None:
    # ranks 1 and 2 die at step 5: rank 1's shards were kept only by rank 2, so the one
    # survivor (rank 0: ranks 0 and 2's shards) cannot rebuild the state; the commit of
    # step 3 is restored, and the driver says why memory was not used
    marker = str(tmp_path / "killed")
    model, trainer = _fit(tmp_path, "adjacent3", checkpoint_every_n_steps=3,
                          snapshot_every_n_steps=2, kill_marker=marker, kill_ranks=(1, 2),
                          step_sleep_s=0.15, num_workers=3, batch_size=BATCH[3])
    assert os.path.exists(marker + ".1") and os.path.exists(marker + ".2")
    assert trainer.num_restarts == 1
    out = capsys.readouterr().out
    assert ("not restoring from the survivors' memory: no survivor holds the FSDP shards of "
            "rank(s) [1] of 3") in out, out
    assert "(step 3," in out, out
    assert trainer.global_step == 16
    for key, value in references(3).state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
