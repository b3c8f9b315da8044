"""Shared set-up of the bolts model corpus tests: the unpacked packages and the import paths.

``bolts_models_root`` unpacks the whole ``pl_bolts`` package of bolts 0.2.2 (nothing emptied:
with ``legacy_torch`` its aggregate ``__init__`` files import) and torchvision 0.28.0 into one
folder. ``bolts_paths`` puts that folder and this one (``bolts_cases``, ``legacy_torch``) first on
``sys.path`` and in ``PYTHONPATH`` (what Ray workers and subprocesses inherit) for a block.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
from collections.abc import Iterator

from corpus_wheels import unpack

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent


def bolts_models_root(root: pathlib.Path) -> pathlib.Path:
    """``root`` holding ``pl_bolts`` (bolts 0.2.2) and ``torchvision`` (0.28.0), unpacked."""
    unpack("bolts", root, "pl_bolts")
    unpack("torchvision", root, "torchvision", "torchvision.libs")
    return root


@contextlib.contextmanager
def bolts_paths(root: pathlib.Path) -> Iterator[None]:
    """``root`` and the corpus helpers importable here and in processes started meanwhile."""
    entries = [str(root), str(HERE)]
    saved = os.environ.get("PYTHONPATH")
    sys.path[:0] = entries
    os.environ["PYTHONPATH"] = os.pathsep.join(entries + [str(REPO)] + ([saved] if saved else []))
    try:
        yield
    finally:
        for entry in entries:
            sys.path.remove(entry)
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        # bolts' modules hold the Lightning they were imported with: the next user imports anew
        # (torchvision stays imported: its operator registrations cannot run twice)
        for name in [n for n in sys.modules if n == "pl_bolts" or n.startswith("pl_bolts.")]:
            del sys.modules[name]
        sys.modules.pop("bolts_cases", None)
