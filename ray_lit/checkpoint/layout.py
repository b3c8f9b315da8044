"""Names and URIs of fault-tolerance checkpoints: the only place they are spelled.

Layout under ``storage_path/run_name/``::

    checkpoints/step-0000000120-e00003/rank_0.pt      rank 0: model, optimizers, schedulers, loops
    checkpoints/step-0000000120-e00003/rank_1.pt      other ranks: their RNG (what a restore reads)
    checkpoints/step-0000000120-e00003/manifest.json  written LAST, atomically, by the driver

``step-<global step>-e<epoch>[-<tag>]`` sorts by step, then epoch.
"""

from __future__ import annotations

MANIFEST = "manifest.json"
PREFIX = "step-"


def checkpoint_name(global_step: int, epoch: int, tag: str = "") -> str:
    """Directory name of a checkpoint; sortable by step, then epoch."""
    suffix = f"-{tag}" if tag else ""
    return f"{PREFIX}{global_step:010d}-e{epoch:05d}{suffix}"


def part_name(world_rank: int) -> str:
    """File name of one rank's part."""
    return f"rank_{world_rank}.pt"


def checkpoints_uri(run_uri: str) -> str:
    """The folder that holds a run's fault-tolerance checkpoints."""
    return f"{run_uri.rstrip('/')}/checkpoints"


def checkpoint_uri(run_uri: str, name: str) -> str:
    return f"{checkpoints_uri(run_uri)}/{name}"


def part_uri(run_uri: str, name: str, world_rank: int) -> str:
    """Where ``world_rank`` writes its part of checkpoint ``name``."""
    return f"{checkpoint_uri(run_uri, name)}/{part_name(world_rank)}"
