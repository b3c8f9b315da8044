"""Run bolts cases on the REAL pytorch-lightning 0.9.0, in a subprocess of the corpus tests.

    python real_lightning09.py OUT.json WORK_DIR CASE [CASE ...]

with the unpacked 0.9.0 wheel, ``pl_bolts`` and torchvision on ``PYTHONPATH`` (the 0.9.0 folder
first, so it shadows any Lightning installed here). 0.9.0 (August 2020) needs a few names that
Python 3.10, NumPy 2 and setuptools have since removed; ``install_shims`` puts them back for this
process only, and ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` gives its ``load_from_checkpoint`` the
pickle loading torch had then (its checkpoints pickle the hparams). Nothing of 0.9.0 is changed.
"""

from __future__ import annotations

import collections
import collections.abc
import json
import os
import pathlib
import sys
import types


def install_shims() -> None:
    """The removed names 0.9.0 imports, for this process only."""
    import numpy as np

    for name in ("Mapping", "Iterable", "Sequence", "MutableMapping", "Callable"):
        setattr(collections, name, getattr(collections.abc, name))
    for name, value in (("bool", bool), ("int", int), ("float", float), ("object", object),
                        ("str", str), ("Inf", np.inf), ("NaN", np.nan)):
        if name not in np.__dict__:
            setattr(np, name, value)
    try:
        import pkg_resources  # noqa: F401
    except ImportError:  # setuptools >= 81 dropped it; 0.9.0 uses two of its names
        from packaging.version import parse

        module = types.ModuleType("pkg_resources")
        module.parse_version = parse
        module.declare_namespace = lambda name: None
        sys.modules["pkg_resources"] = module


def main(argv: list[str]) -> None:
    """Write one ``run_case`` report per case to ``argv[0]``."""
    out, work, names = pathlib.Path(argv[0]), pathlib.Path(argv[1]), argv[2:]
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    install_shims()
    import legacy_torch

    legacy_torch.install()
    import pytorch_lightning

    assert pytorch_lightning.__version__ == "0.9.0", pytorch_lightning.__file__
    import bolts_cases

    reports = {}
    for name in names:
        reports[name] = bolts_cases.run_case(name, work / name)
        out.write_text(json.dumps(reports))  # what finished survives a timeout


if __name__ == "__main__":
    main(sys.argv[1:])
