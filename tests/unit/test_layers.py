"""The house's rules, read from the source (every import, function-local ones included).

- Packages import only downwards in the layer order below, and no two packages import each
  other (no package circle).
- ``worker/`` never imports ``driver/``: what runs on the actor is one folder.
- No module of ``driver/`` imports ``torch.distributed``.
- Every module imports on its own (no import-time circle).
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2] / "ray_lit"

# the floors, top to bottom: a package may import its own floor's packages only if it is itself,
# and any package on a lower floor
LAYERS: list[set[str]] = [
    {"__main__"},  # the command line: it installs compat, then runs a script
    {"tune", "testing", "compat", "strategies_cli", "cli"},
    {"trainer", "__init__"},
    {"adoption"},  # modules and callbacks built on the real Lightning, adopted for the Trainer
    {"config"},
    {"option_rules"},  # the rule of every Trainer option (config checks values with it)
    {"driver"},
    {"worker"},
    {"checkpoint"},
    {"data"},
    {"loop"},
    {"strategies"},
    {"callbacks", "core"},
    {"metrics"},
    {"loggers"},
    {"storage"},
    {"messages"},
    {"errors", "_version"},
]


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _floor(package: str) -> int:
    for i, floor in enumerate(LAYERS):
        if package in floor:
            return i
    raise AssertionError(f"package ray_lit.{package} is on no floor of LAYERS: add it")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: pathlib.Path, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # also imports inside module-level if/try blocks
        nodes = [n for top in tree.body for n in ast.walk(top)
                 if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _is_type_checking_only(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and sub.module:
                    out.add(sub.module)
    return out


MODULES = _modules()


def _edges() -> list[tuple[str, str]]:
    edges = []
    for name, path in MODULES.items():
        typing_only = _is_type_checking_only(path)
        for target in _imports(path):
            if target.startswith("ray_lit") and target in MODULES and target not in typing_only:
                edges.append((name, target))
    return edges


def test_every_package_is_on_a_floor_and_imports_only_downwards() -> None:
    wrong = []
    for source, target in _edges():
        a, b = _package(source), _package(target)
        if a == b or b == "__init__" and target == "ray_lit":
            continue
        if _floor(b) <= _floor(a):
            wrong.append(f"{source} -> {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def test_no_package_circle() -> None:
    pairs = {(_package(s), _package(t)) for s, t in _edges() if _package(s) != _package(t)}
    circles = sorted(f"{a} <-> {b}" for a, b in pairs if (b, a) in pairs and a < b)
    assert not circles, circles


def test_the_worker_never_imports_the_driver() -> None:
    wrong = [f"{s} -> {t}" for s, t in _edges()
             if _package(s) == "worker" and _package(t) == "driver"]
    assert not wrong, wrong


def test_the_driver_never_imports_torch_distributed() -> None:
    """No module of driver/ imports it (the driver coordinates; collectives are the workers').
    ``import torch`` itself loads torch.distributed, so the rule is about our code's use."""
    for name, path in MODULES.items():
        if _package(name) == "driver":
            direct = [t for t in _imports(path) if t.startswith("torch.distributed")]
            assert not direct, f"{name} imports {direct}"


def test_the_layer_table_catches_a_wrong_import() -> None:
    # the checker itself: a loop module importing the driver is against the order
    assert _floor(_package("ray_lit.loop.fit_loop")) > _floor(_package("ray_lit.driver.launch"))


_IMPORT_EACH = r"""
import importlib, os, sys
import torch, ray  # the heavy third-party imports once; each ray_lit module in its own fork
failed = []
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent by exit code
            print(f"{module}: {type(exc).__name__}: {exc}", file=sys.stderr)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(module)
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own() -> None:
    """Imported first in a fresh interpreter (a fork that has only torch and ray loaded), each
    module must import: no circle at import time, whichever module a user imports first."""
    modules = sorted(m for m in MODULES if not m.endswith("__main__"))
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]


def test_the_import_check_catches_a_circle(tmp_path: pathlib.Path) -> None:
    # the checker itself: two modules importing each other's names fail when imported first
    (tmp_path / "circ_a.py").write_text("from circ_b import B\nA = 1\n")
    (tmp_path / "circ_b.py").write_text("from circ_a import A\nB = 2\n")
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, "circ_a"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path,
                            env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1 and "circ_a" in result.stdout
