"""The test suite's own hygiene (REVIEW §2.6 / §5 "Test defects"), checked on the source so the
defects cannot come back:

- no test file imports a ``conftest`` by name: pytest loads both ``tests/conftest.py`` and
  ``tests/unit/conftest.py`` itself, and ``from conftest import X`` gets whichever one
  ``sys.path`` happens to find first. Shared doubles live in ``tests/unit/doubles.py``.
- no two files of ``tests/unit`` define the same private helper (same name, same body): a
  shared one belongs in ``doubles.py`` (plain functions) or ``conftest.py`` (fixtures).
"""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

TESTS = pathlib.Path(__file__).resolve().parent.parent
UNIT = TESTS / "unit"


def conftest_imports(source: str) -> list[str]:
    """The modules named ``conftest`` (any package path) that ``source`` imports, anywhere."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[-1] == "conftest"]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module.split(".")[-1] == "conftest":
                found.append(node.module)
            else:  # ``from tests.unit import conftest``
                found += [f"{node.module}.{a.name}" for a in node.names if a.name == "conftest"]
    return found


def duplicated_helpers(sources: dict[str, str]) -> dict[str, list[str]]:
    """Module-level functions whose name starts with ``_`` and that two or more of ``sources``
    (file name -> text) define with the same name and the same body: name -> files."""
    where: dict[tuple[str, str], list[str]] = defaultdict(list)
    for file, source in sources.items():
        for node in ast.parse(source).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name[0] == "_":
                # ast.dump leaves out line numbers: only the code counts
                where[(node.name, ast.dump(node))].append(file)
    return {name: files for (name, _), files in where.items() if len(files) > 1}


def _read(paths: list[pathlib.Path]) -> dict[str, str]:
    return {str(p.relative_to(TESTS)): p.read_text(encoding="utf-8") for p in sorted(paths)}


def test_no_test_file_imports_a_conftest_by_name():
    offenders = {f: mods for f, src in _read(list(TESTS.rglob("*.py"))).items()
                 if (mods := conftest_imports(src))}
    assert offenders == {}, "import shared test doubles with `from doubles import ...`"


def test_no_two_unit_test_files_define_the_same_helper():
    # tests/unit only: it has the shared homes (doubles.py, conftest.py); a helper that a Ray
    # test module shares with a unit one has no common module to live in yet
    dups = duplicated_helpers(_read(list(UNIT.glob("*.py"))))
    assert dups == {}, "move the helper to tests/unit/doubles.py or a conftest.py fixture"


def test_the_conftest_check_sees_every_import_form():
    for source in ["from conftest import X", "import conftest", "import tests.unit.conftest",
                   "from tests.unit.conftest import X", "from tests.unit import conftest",
                   "def f():\n    from conftest import X\n"]:
        assert conftest_imports(source), source
    for source in ["from doubles import X", "import conftest_extra", "from . import x",
                   "from tests.unit import doubles"]:
        assert conftest_imports(source) == [], source


def test_the_duplicate_check_needs_the_same_name_and_the_same_body():
    helper = "def _fit(model):\n    return model.fit()\n"
    other_body = "def _fit(model):\n    return model.fit(1)\n"
    other_name = "def _run(model):\n    return model.fit()\n"
    public = "def fit(model):\n    return model.fit()\n"
    in_class = "class A:\n    def _fit(model):\n        return model.fit()\n"
    assert duplicated_helpers({"a.py": helper, "b.py": "\n\n" + helper}) == {
        "_fit": ["a.py", "b.py"]}  # moved lines are still the same helper
    for second in [other_body, other_name, public, in_class]:
        assert duplicated_helpers({"a.py": helper, "b.py": second}) == {}, second
    assert duplicated_helpers({"a.py": public, "b.py": public}) == {}  # only `_` helpers
