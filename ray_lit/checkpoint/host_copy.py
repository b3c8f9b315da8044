"""``HostSnapshot``: a rank's checkpoint state copied to host memory with little stall.

A fault-tolerance checkpoint must capture the state of one step boundary while training goes
on. Most of its bytes are parameters and optimizer state, and those change only inside
``optimizer.step``. So at the boundary only the small, fast-changing part is copied (buffers
that ``forward`` updates, counters, RNG and callback state); the large tensors are copied by the
writer thread while the next step's forward and backward run, and a step pre-hook on every
optimizer holds ``optimizer.step`` back until that copy is done (``fence``). Training is
blocked for the small copy plus whatever of the large copy the forward/backward did not cover.

Host buffers are kept between checkpoints and reused (pinned when the state lives on a GPU):
allocating and page-faulting a fresh copy of a large model each time costs more than the copy.

A parameter changed in place outside ``optimizer.step`` while the copy runs (for example
weight clipping in ``training_step``) would tear the copy; the tensors' version counters show
it, the copy is then discarded (never written, never committed) and ``torn`` tells the caller,
which falls back to synchronous copies.
"""

from __future__ import annotations

import threading
from typing import Any

import torch


class HostSnapshot:
    """Host copies of a state tree, reusing buffers from one capture to the next.

    Used by every rank's ``CheckpointWriter`` (one instance per worker, one capture in flight).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._copied = threading.Event()
        self._copied.set()
        self._hooks: list[Any] = []
        self._ready_event: Any = None
        self.torn = False
        self.fence_wait_s: list[float] = []

    # --- at the step boundary (loop thread) -----------------------------------------------------
    def capture(self, state: Any, optimizers: list[Any], deferred: bool = True) -> Any:
        """The state with every tensor replaced by a host buffer. Tensors that share storage
        with a parameter or an optimizer state tensor are copied later by ``copy_deferred``
        when ``deferred`` (the optimizers are fenced until then); all others are copied now."""
        self.fence()  # hooks of an earlier capture that no step has met yet
        if deferred and not all(hasattr(o, "register_step_pre_hook") for o in optimizers):
            # an optimizer wrapper without step hooks (bolts' LARSWrapper) cannot fence the
            # deferred copy: copy everything now instead
            deferred = False
        live = _storages_changed_only_by_step(optimizers) if deferred else set()
        self._pending = []
        self.torn = False
        out = self._walk(state, (), live)
        if self._pending:
            self._copied.clear()
            if any(src.is_cuda for _, src, _ in self._pending):
                # the side stream of the copy starts after the work queued so far
                self._ready_event = torch.cuda.current_stream().record_event()
            for optimizer in optimizers:
                self._hooks.append(optimizer.register_step_pre_hook(self._fence_hook))
        return out

    def _walk(self, obj: Any, path: tuple, live: set[int] | None) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._host_copy(obj, path, live)
        if isinstance(obj, dict):
            items = ((k, self._walk(v, path + (k,), live)) for k, v in obj.items())
            return dict(items) if type(obj) is dict else type(obj)(items)
        if isinstance(obj, list):
            return [self._walk(v, path + (i,), live) for i, v in enumerate(obj)]
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(self._walk(v, path + (i,), live) for i, v in enumerate(obj))
        return obj

    def _host_copy(self, tensor: torch.Tensor, path: tuple, live: set[int] | None
                   ) -> torch.Tensor:
        """The host buffer for ``tensor`` (filled now, or queued when deferred); ``live`` None:
        only allocate and touch the buffer (``prepare``)."""
        tensor = tensor.detach()
        if tensor.is_sparse or not tensor.is_contiguous() or tensor.dtype.is_complex:
            return tensor if live is None else tensor.to("cpu", copy=True)  # rare layouts
        key = (path, tuple(tensor.shape), tensor.dtype)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                 pin_memory=tensor.is_cuda)
            if live is None:
                buffer.zero_()  # touch every page now
            self._buffers[key] = buffer
        if live is None:
            return buffer
        if tensor.device.type in ("cpu", "cuda") and _storage_key(tensor) in live:
            self._pending.append((buffer, tensor, tensor._version))
        else:
            buffer.copy_(tensor)
        return buffer

    def prepare(self, state: Any) -> None:
        """Allocate and touch the host buffers for ``state`` (any thread, no copy): the first
        checkpoint then does not page-fault a model-sized copy into existence while an
        optimizer step waits for it."""
        self._walk(state, (), None)

    # --- the writer thread ----------------------------------------------------------------------
    def copy_deferred(self) -> bool:
        """Copy the deferred tensors (writer thread); False when a tensor changed under the
        copy (the capture is torn and must not be written)."""
        try:
            if not self._pending:
                return True
            with torch.no_grad():
                if self._ready_event is not None:
                    stream = torch.cuda.Stream()
                    stream.wait_event(self._ready_event)
                    with torch.cuda.stream(stream):
                        for dst, src, _ in self._pending:
                            dst.copy_(src, non_blocking=True)
                    stream.synchronize()
                else:
                    for dst, src, _ in self._pending:
                        dst.copy_(src)
            self.torn = any(src._version != version for _, src, version in self._pending)
            return not self.torn
        finally:
            self._pending = []
            self._ready_event = None
            self._copied.set()

    # --- the fence (loop thread) ----------------------------------------------------------------
    def _fence_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.fence()

    def fence(self) -> None:
        """Block until the deferred copy is done (before any optimizer step)."""
        if not self._copied.is_set():
            import time

            start = time.perf_counter()
            self._copied.wait()
            self.fence_wait_s.append(time.perf_counter() - start)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def release(self) -> None:
        """Drop the buffers (end of fit): they are as large as the model and its optimizer."""
        self.fence()
        self._buffers = {}


def _storage_key(tensor: torch.Tensor) -> int:
    local = getattr(tensor, "_local_tensor", None)  # a DTensor (FSDP): its shard's storage
    if isinstance(local, torch.Tensor):
        tensor = local
    try:
        return tensor.untyped_storage().data_ptr()
    except Exception:  # tensors without storage (meta, some wrappers)
        return -1


def _storages_changed_only_by_step(optimizers: list[Any]) -> set[int]:
    """Storages of the parameters and optimizer state of ``optimizers``: in the loop, only
    ``optimizer.step`` writes to them."""
    keys: set[int] = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            keys.update(_storage_key(p) for p in group["params"])
        for state in optimizer.state.values():
            keys.update(_storage_key(v) for v in state.values() if isinstance(v, torch.Tensor))
    keys.discard(-1)
    keys.discard(0)
    return keys
