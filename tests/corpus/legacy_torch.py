"""What 2020-era code needs from today's torch to import, installed at test time only.

bolts 0.2.2 imports ``torch._six`` (removed in torch 2.0) and torchvision. The registry's
torchvision 0.28.0 matches torch 2.13, but its ``_C`` extension links CUDA libraries this CPU-only
torch lacks: the extension does not load (torchvision then reports no C++ ops), and
``torchvision/_meta_registrations.py`` dies at import registering fake kernels for
``torchvision::nms`` / ``torchvision::qnms``, two operators that would have been defined by that
extension. Declaring those two schemas here (schemas only, no kernel) lets the pure-Python parts
of torchvision (models, transforms, datasets, utils) import and run; the C++ ops themselves
(``nms``, ``roi_align``, ``deform_conv2d``, ...) stay unavailable, so detection models cannot run.

``install`` runs in the test process before anything of bolts is imported, and on ray_lit's Ray
workers as a ``RAY_LIT_WORKER_SETUP`` hook (``legacy_torch:install``) before they unpickle a run.
"""

from __future__ import annotations

import collections.abc
import sys
import types

import torch
import torch.library

WORKER_HOOK = "legacy_torch:install"
# the operators torchvision registers fake kernels for without checking that its extension loaded
_UNGUARDED_OPS = ("nms", "qnms")
_library: torch.library.Library | None = None


def _torch_six() -> types.ModuleType:
    """A ``torch._six`` with the names bolts 0.2.2 imports from it."""
    six = types.ModuleType("torch._six")
    six.container_abcs = collections.abc
    six.string_classes = (str, bytes)
    six.int_classes = int
    six.PY3 = True
    six.inf = float("inf")
    return six


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def install() -> None:
    """Make ``torch._six`` and ``import torchvision`` work; idempotent, per process (any rank)."""
    global _library
    if "torch._six" not in sys.modules:
        sys.modules["torch._six"] = _torch_six()
    missing = [name for name in _UNGUARDED_OPS if not _has_op(name)]
    if missing and _library is None:
        # kept alive for the process: a Library object unregisters its schemas when collected
        _library = torch.library.Library("torchvision", "DEF")
        for name in missing:
            _library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
