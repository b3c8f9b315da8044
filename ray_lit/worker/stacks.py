"""Every thread's Python stack in this worker, and whether its loop waits in a collective.

Used to diagnose a hang: the controller asks every rank for its stacks; the rank whose loop
thread is *not* waiting in a collective (stuck in a data loader, in user code, on a lock) is
the culprit, the ranks waiting in a collective are its victims. Read with
``sys._current_frames`` from the actor's call thread, so it works while the loop thread is
blocked, without py-spy on the machine.
"""

from __future__ import annotations

import sys
import threading
import traceback
from types import FrameType

from ray_lit.messages import RankStacks

# where a loop thread waits for its peers: torch.distributed's collectives, DDP's forward, and
# a backward whose gradients DDP all-reduces (the autograd engine waits for the reducer)
_COLLECTIVE_FILES = ("torch/distributed/", "torch/nn/parallel/distributed.py")
_BACKWARD_FILES = ("torch/autograd/__init__.py", "torch/autograd/graph.py",
                   "torch/_tensor.py")


def waits_in_collective(frames: list[traceback.FrameSummary]) -> bool:
    """Whether a stack (outermost first) waits in a collective or a synchronised backward: its
    innermost frame decides (a user's step runs *inside* DDP's forward, so a frame of
    torch.distributed further out says nothing)."""
    if not frames:
        return False
    innermost = frames[-1].filename.replace("\\", "/")
    return any(part in innermost for part in _COLLECTIVE_FILES + _BACKWARD_FILES)


def _user_frame(frames: list[traceback.FrameSummary]) -> str:
    """The innermost frame outside torch, Python's threading and ray_lit's own loop: where the
    rank is in the user's code (or, failing that, the innermost frame)."""
    skip = ("/torch/", "/threading.py", "/ray_lit/loop/", "/ray_lit/worker/",
            "/ray_lit/strategies/", "/ray/")
    for frame in reversed(frames):
        if not any(part in frame.filename.replace("\\", "/") for part in skip):
            return f'File "{frame.filename}", line {frame.lineno}, in {frame.name}'
    if not frames:
        return "(no frames)"
    last = frames[-1]
    return f'File "{last.filename}", line {last.lineno}, in {last.name}'


def rank_stacks(world_rank: int, loop_thread: threading.Thread | None) -> RankStacks:
    """This worker's threads and their stacks; ``loop_thread`` is the one running the loop."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts: list[str] = []
    loop_frames: list[traceback.FrameSummary] = []
    frames: dict[int, FrameType] = sys._current_frames()
    for ident, frame in frames.items():
        summary = traceback.extract_stack(frame)
        parts.append(f"--- rank {world_rank}, thread {names.get(ident, ident)} ---\n"
                     + "".join(traceback.format_list(summary)))
        if loop_thread is not None and ident == loop_thread.ident:
            loop_frames = list(summary)
    return RankStacks(rank=world_rank, text="\n".join(parts),
                      in_collective=waits_in_collective(loop_frames),
                      where=_user_frame(loop_frames) if loop_frames else "(no loop running)")
