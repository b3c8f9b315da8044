"""torch.distributed setup inside each worker: backend choice, rendezvous address, teardown.

The rendezvous is a TCP store served by world rank 0 on its node IP; every rank joins with the
same timeout, so a peer that never arrives (its actor died, its node is gone) surfaces as an
error after ``timeout_s`` rather than a hang the controller would have to detect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from datetime import timedelta

from ray_lit.errors import MisconfigurationException

__all__ = [
    "choose_backend",
    "destroy_process_group",
    "find_free_port",
    "init_process_group",
]

log = logging.getLogger("ray_lit")


def choose_backend(device_type: str) -> str:
    """The collective backend for ``device_type``: gloo on CPU, NCCL on CUDA, XLA on TPU.

    Called on the driver when the worker group is formed (the answer is the same on every
    rank).

    Raises:
        MisconfigurationException: an unknown device type, or TPU without ``torch_xla``.
    """
    kind = device_type.lower()
    if kind == "cpu":
        return "gloo"
    if kind in ("cuda", "gpu"):
        return "nccl"
    if kind in ("xla", "tpu"):
        try:
            import torch_xla  # noqa: F401
        except ImportError as err:
            raise MisconfigurationException(
                "accelerator='tpu' needs torch_xla installed on the workers (pip install "
                "torch_xla on the TPU nodes), or choose accelerator='cpu'/'gpu'.") from err
        return "xla"
    raise MisconfigurationException(
        f"No collective backend for device type {device_type!r}; expected 'cpu', 'cuda' or "
        "'xla' (accelerator='cpu', 'gpu' or 'tpu').")


def find_free_port(host: str = "") -> int:
    """A TCP port that is free now on this node (called by world rank 0's actor).

    Binds the wildcard address by default because the TCP store listens on every interface:
    a port free on one address but taken on another would still fail there. Another process
    could take the port in the moment before the store binds it; forming the group then
    fails with the bind error (nothing retries it: the window is a few milliseconds).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def init_process_group(*, backend: str, master_addr: str, master_port: int, world_rank: int,
                       world_size: int, timeout_s: float, local_rank: int | None = None) -> None:
    """Join the worker group's process group. COLLECTIVE: every rank must call it.

    Also sets ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` (and ``LOCAL_RANK``
    when given) for user code that reads them, as torchrun would.

    Args:
        backend: ``gloo``, ``nccl`` or ``xla`` (from ``choose_backend``).
        master_addr: world rank 0's node IP.
        master_port: a free port on that node (``find_free_port`` run by rank 0).
        world_rank: this worker's rank.
        world_size: number of workers.
        timeout_s: how long to wait for the peers, and the collectives' timeout.
        local_rank: this worker's rank on its node, if known.

    Raises:
        RuntimeError / DistStoreError: a peer did not join within ``timeout_s``.
    """
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
                       "RANK": str(world_rank), "WORLD_SIZE": str(world_size)})
    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)
    if backend == "nccl":
        # make NCCL errors and timeouts abort the process instead of hanging it (torchrun's
        # default; Ray does not set it)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if backend == "xla":
        import torch_xla.distributed.xla_backend  # noqa: F401  registers the backend
    if dist.is_initialized():
        # a reused actor from an earlier attempt: the old group would point at dead peers
        destroy_process_group()
    log.debug("ray_lit: rank %d/%d joining %s at %s:%d", world_rank, world_size, backend,
              master_addr, master_port)
    dist.init_process_group(backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
                            rank=world_rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def destroy_process_group() -> None:
    """Leave the process group (each rank, at teardown); a no-op when not joined.

    Errors are swallowed: teardown often runs because a peer died, and the group's own
    cleanup failing must not mask that.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
