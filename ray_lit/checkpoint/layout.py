"""Names and URIs of fault-tolerance checkpoints: the only place they are spelled.

Layout under ``storage_path/run_name/``::

    checkpoints/step-0000000120-e00003/rank_0-<fence>.pt  rank 0: model, optimizers, loops
    checkpoints/step-0000000120-e00003/rank_1-<fence>.pt  other ranks: their RNG (for a restore)
    checkpoints/step-0000000120-e00003/manifest.json      written LAST, atomically, by the driver

``step-<global step>-e<epoch>[-<tag>]`` sorts by step, then epoch. ``<fence>`` names the
attempt that wrote the part (a token of the driver's run and the attempt number): the manifest
lists the exact files it commits, so a straggler of an earlier attempt, or an orphan of a
killed driver, writing the same checkpoint can never end up inside a committed one. Runs
written before fencing have ``rank_<r>.pt`` parts; they are read as before.
"""

from __future__ import annotations

import re

MANIFEST = "manifest.json"
PREFIX = "step-"


def checkpoint_name(global_step: int, epoch: int, tag: str = "") -> str:
    """Directory name of a checkpoint; sortable by step, then epoch."""
    suffix = f"-{tag}" if tag else ""
    return f"{PREFIX}{global_step:010d}-e{epoch:05d}{suffix}"


def part_name(world_rank: int, fence: str = "") -> str:
    """File name of one rank's part, written by the attempt ``fence``."""
    return f"rank_{world_rank}-{fence}.pt" if fence else f"rank_{world_rank}.pt"


_PART = re.compile(r"rank_(\d+)(?:-[A-Za-z0-9]+)?\.pt")


def part_rank(file_name: str) -> int | None:
    """The world rank of a part file's name, or None when it is not a part."""
    match = _PART.fullmatch(file_name)
    return int(match.group(1)) if match else None


def checkpoints_uri(run_uri: str) -> str:
    """The folder that holds a run's fault-tolerance checkpoints."""
    return f"{run_uri.rstrip('/')}/checkpoints"


def checkpoint_uri(run_uri: str, name: str) -> str:
    return f"{checkpoints_uri(run_uri)}/{name}"


def part_uri(run_uri: str, name: str, world_rank: int, fence: str = "") -> str:
    """Where ``world_rank`` of attempt ``fence`` writes its part of checkpoint ``name``."""
    return f"{checkpoint_uri(run_uri, name)}/{part_name(world_rank, fence)}"
