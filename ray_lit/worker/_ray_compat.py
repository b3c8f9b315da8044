"""The one file of workarounds against Ray (and torch) internals, with the versions checked.

Checked on Ray 2.40 and 2.60, torch 2.4 to 2.13. Each trick is guarded: a Ray whose internals
moved keeps its default behaviour (and its memory), never fails the worker.
"""

from __future__ import annotations

import sys


def warm_imports() -> None:
    """Import what DDP's constructor and the loop need (~1.5 s for ``torch._dynamo``) on a
    side thread while the process group forms and the payload ships."""
    try:
        import torch._dynamo  # noqa: F401
        import torch.nn.parallel  # noqa: F401

        import ray_lit.loop.stages  # noqa: F401
        import ray_lit.worker.host  # noqa: F401
    except Exception:  # only a head start; the real import reports any problem
        pass


def serialization_context_without_arrow() -> None:
    """Create this process's Ray serialization context while ``pyarrow`` looks uninstalled.

    Ray registers Ray Data's Arrow serializers in every worker's context and imports ``pyarrow``
    to do it: ~25 MiB of resident libraries per training worker, a third of what a Ray actor
    costs over a plain DDP process. The serializers only make *sending* sliced Arrow tables from
    this process cheaper (receiving needs nothing registered), and a training worker does not
    send Arrow data; if it ever does, pyarrow's own pickling is used. The user's code may still
    import ``pyarrow`` afterwards as usual. Called first thing in the actor's constructor,
    before any argument has made Ray build the context; a Ray without this private entry point
    just keeps its default (and the memory).
    """
    if "pyarrow" in sys.modules:
        return
    try:
        import ray
        import ray._private.worker as ray_worker

        if getattr(ray_worker.global_worker, "mode", None) != ray.WORKER_MODE:
            return  # not a Ray worker process: a driver keeps Ray's defaults
        sys.modules["pyarrow"] = None  # type: ignore[assignment]  # "import pyarrow" now fails
        try:
            ray_worker.global_worker.get_serialization_context()
        finally:
            if "pyarrow" in sys.modules and sys.modules["pyarrow"] is None:
                del sys.modules["pyarrow"]
    except Exception:  # a Ray whose internals moved: keep its default (and the memory)
        pass
