"""What the driver says and keeps about a diagnosed hang (driver side).

``describe_hang`` names the culprit among the ranks' stacks: the rank whose loop is not waiting in
a collective (the ranks that wait are its victims). ``write_stacks`` keeps every rank's stacks in
one text file of the run, so the diagnosis can be read after the restart.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["describe_hang", "write_stacks"]


def describe_hang(stacks: list[Any], hung: dict[int, float],
                  hang_timeout_s: Any) -> tuple[int, str]:
    """``(culprit rank, the diagnosis's text)`` from every rank's stacks (None: no answer) and
    the ranks suspected of a hang with their seconds without progress."""
    free = [s for s in stacks if s is not None and not s.in_collective]
    culprit = next((s for s in free if s.rank in hung), free[0] if free else None)
    rank = culprit.rank if culprit is not None else min(hung)
    waiting = [s.rank for s in stacks if s is not None and s.in_collective]
    idle = hung.get(rank, max(hung.values()))
    text = (f"rank {rank} made no progress for {idle:.0f} s (worker_hang_timeout_s="
            f"{hang_timeout_s!r})")
    if culprit is not None:
        text += f"; it is not in a collective: {culprit.where}"
    if waiting:
        text += f"; rank(s) {', '.join(map(str, waiting))} wait in a collective"
    return rank, text


def write_stacks(stacks: list[Any], name: str, manager: Any, trainer: Any) -> str:
    """Every rank's stacks in one text file ``hangs/<name>`` of the run (the checkpoint
    manager's storage; else the Trainer's last run directory; else ``ray_lit_hangs/`` under
    ``default_root_dir``). Returns its path; raises what the write raised."""
    body = "\n\n".join(s.text if s is not None else "--- (a rank did not answer) ---"
                        for s in stacks)
    if manager is not None:
        manager.storage.write_bytes(f"hangs/{name}", body.encode())
        return f"{manager.run_uri}/hangs/{name}"
    run_dir = getattr(trainer, "run_dir", None)
    if run_dir:  # validate / test / predict after this Trainer's fit: that run's
        from ray_lit.storage.filesystem import Storage

        Storage(run_dir).write_bytes(f"hangs/{name}", body.encode())
        return f"{run_dir.rstrip('/')}/hangs/{name}"
    root = getattr(trainer, "default_root_dir", None) or "."
    directory = os.path.join(root, "ray_lit_hangs")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(body)
    return path
