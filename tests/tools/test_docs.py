"""docs/paper-mapping.md points at code that exists: every file, every `file.py: name` pair and every code name on
the page is defined where the page says, so the map cannot drift from the code when functions move."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hope_hf"
MAPPING = ROOT / "docs" / "paper-mapping.md"
# names of the paper's mathematics, written in code font in the tables but not code identifiers
MATH_NAMES = {"W1", "W2", "W_in", "W_out"}


def _defined_names(path: Path) -> set:
    """Every name a file defines: functions, classes, assignments, attributes set, arguments, string constants."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            names.add(node.value)
    return names


def _resolve(file: str) -> Path | None:
    """A file named in the page: relative to hope_hf/ (as the page says) or to the repository (tests, benchmarks)."""
    for base in (PACKAGE, ROOT):
        if (base / file).is_file():
            return base / file
    return None


def _table_cells() -> list[str]:
    """The page cut at table cells and lines, so that no match spans two cells."""
    return [cell for line in MAPPING.read_text().splitlines() for cell in line.split("|")]


FILE_AND_NAME = re.compile(r"`([\w/]+\.py)`:?\s+`([A-Za-z_][\w.]*)`|`([\w/]+\.py)::(\w+)`")
MODULE_ATTRIBUTE = re.compile(r"`([a-z_]+)\.([A-Z_][A-Z0-9_]+)`")
CODE_NAME = re.compile(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\(\))?`", re.ASCII)


def test_every_file_and_name_pair_is_defined_in_that_file():
    pairs = []
    for cell in _table_cells():
        for m in FILE_AND_NAME.finditer(cell):
            file, name = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            pairs.append((file, name))
        pairs += [(f"{m.group(1)}.py", m.group(2)) for m in MODULE_ATTRIBUTE.finditer(cell)]
    assert len(pairs) >= 5, "the page's `file.py: name` references were not found; update this test's patterns"
    missing = []
    for file, name in pairs:
        path = _resolve(file)
        if path is None:
            missing.append(f"{file} (no such file)")
        elif not set(name.split(".")) <= _defined_names(path):
            missing.append(f"{file}: {name}")
    assert not missing, f"docs/paper-mapping.md names code that is not where it says: {missing}"


def test_every_code_name_on_the_page_exists_in_the_package():
    defined = set()
    for path in PACKAGE.rglob("*.py"):
        defined |= _defined_names(path) | {path.stem}
    missing = set()
    for cell in _table_cells():
        for m in CODE_NAME.finditer(cell):
            parts = [p for p in m.group(1).split(".") if p not in MATH_NAMES]
            missing |= {m.group(1) for p in parts if p not in defined and p != "py"}
    assert not missing, f"docs/paper-mapping.md names code that does not exist: {sorted(missing)}"


@pytest.mark.parametrize("name", ["HopeDecoderLayer", "reference_titans"])
def test_the_checks_see_a_renamed_function(name, monkeypatch):
    """The checks fail when a name the page uses disappears (so they cannot pass vacuously)."""
    original = _defined_names

    def without(path):
        return original(path) - {name}

    monkeypatch.setitem(globals(), "_defined_names", without)
    with pytest.raises(AssertionError, match=name):
        test_every_file_and_name_pair_is_defined_in_that_file()
