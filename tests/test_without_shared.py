"""The ``shared`` marker (tests/conftest.py) reaches every test that reads ../shared.

CI runs the suite with ../shared, then ``TOME_SHARED_DIR=none pytest -m shared`` (.ci/run): only
the marked tests run again without it, as on a user's clone. A test that read the shared folder
some other way than through the fixtures of ``conftest._SHARED_FIXTURES`` would be left out of
that second run; these checks find such reads in the test sources.
"""

from __future__ import annotations

import ast
from pathlib import Path

import conftest

TESTS = Path(__file__).resolve().parent
# What reads the shared folder: conftest's paths, or a path spelled with "shared" in it.
_NAMES = {"SHARED", "DINOV2_DIR", "IMAGES_DIR"}


def _reads_shared(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in _NAMES
    if isinstance(node, ast.alias):
        return node.name in _NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in _NAMES and isinstance(node.value, ast.Name) and node.value.id == "conftest"
    return isinstance(node, ast.Constant) and node.value in ("shared", "../shared")


def _readers(tree: ast.Module) -> list[tuple[str, int]]:
    """(outermost function, or "<module>", line) of each read of the shared folder."""
    found = []
    for top in tree.body:
        owner = top.name if isinstance(top, ast.FunctionDef | ast.AsyncFunctionDef) else "<module>"
        found += [(owner, node.lineno) for node in ast.walk(top) if _reads_shared(node)]
    return found


def test_only_the_marked_fixtures_read_the_shared_folder():
    strays = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name in ("conftest.py", Path(__file__).name):
            continue
        for owner, line in _readers(ast.parse(path.read_text(), str(path))):
            if owner not in conftest._SHARED_FIXTURES:
                strays.append(f"{path.name}:{line} in {owner}")
    assert strays == [], "read ../shared outside a fixture of conftest._SHARED_FIXTURES: add it there"


def test_every_marked_fixture_exists():
    defined = set()
    for path in TESTS.glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        defined |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert sorted(conftest._SHARED_FIXTURES - defined) == []


def test_none_hides_the_shared_folder(monkeypatch):
    monkeypatch.setenv("TOME_SHARED_DIR", "none")
    assert not conftest._shared_dir().exists()
    monkeypatch.setenv("TOME_SHARED_DIR", "/somewhere/else")
    assert conftest._shared_dir() == Path("/somewhere/else")
    monkeypatch.delenv("TOME_SHARED_DIR")
    assert conftest._shared_dir() == TESTS.parent.parent / "shared"
