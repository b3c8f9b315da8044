"""The real packages the corpus runs, fetched from the package registry at test time.

Wheels come from PyPI with ``pip download --no-deps`` into ``RAY_LIT_CORPUS_DIR`` (default
``~/.cache/ray_lit/corpus``; ``.ci/run`` fills it first) and are unpacked into a test's temporary
folder, never installed: bolts and pytorch-lightning 0.9.0 would pull in the real Lightning, and
torchvision would pull in a CUDA torch. A test skips only when a wheel can be neither found
there nor downloaded.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

CORPUS_DIR = pathlib.Path(os.environ.get("RAY_LIT_CORPUS_DIR",
                                         pathlib.Path.home() / ".cache" / "ray_lit" / "corpus"))
# requirement -> the wheel's file name pattern (torchvision's names its platform)
WHEELS = {
    "bolts": ("pytorch-lightning-bolts==0.2.2", "pytorch_lightning_bolts-0.2.2-py3-none-any.whl"),
    "lightning09": ("pytorch-lightning==0.9.0", "pytorch_lightning-0.9.0-py3-none-any.whl"),
    # the release matching torch 2.13; its C++ extension does not load here (legacy_torch.py)
    "torchvision": ("torchvision==0.28.0", "torchvision-0.28.0-*.whl"),
}


def corpus_wheel(key: str) -> pathlib.Path:
    """The wheel for ``key``, downloaded on first use; skips the test if it cannot be had."""
    spec, pattern = WHEELS[key]
    found = sorted(CORPUS_DIR.glob(pattern))
    if not found:
        CORPUS_DIR.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--dest", str(CORPUS_DIR), spec], check=True, timeout=300,
                           capture_output=True)
        except (subprocess.SubprocessError, OSError) as err:
            pytest.skip(f"cannot download {spec}: {err}")
        found = sorted(CORPUS_DIR.glob(pattern))
    if not found:
        pytest.skip(f"pip download {spec} produced no {pattern}")
    return found[-1]


def unpack(key: str, root: pathlib.Path, *packages: str) -> pathlib.Path:
    """Unpack ``packages`` (top-level folders) of wheel ``key`` into ``root``; returns ``root``,
    the folder to put on ``sys.path``."""
    prefixes = tuple(f"{name}/" for name in packages)
    with zipfile.ZipFile(corpus_wheel(key)) as wheel:
        wheel.extractall(root, [n for n in wheel.namelist() if n.startswith(prefixes)])
    return root
