"""The wheel holds the whole package: every module, the package data, the ``tome`` command.

The wheel is built as ``pip wheel`` builds it, from a copy of the source (so that nothing is
written into the checkout), without build isolation so that no network is needed: the
installed setuptools stands in for the isolated one. .ci/run also installs a wheel (built
with isolation) into a fresh venv and imports every module there (.ci/check_wheel.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tome"

pytestmark = pytest.mark.slow


def _source_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _dist_info(archive: zipfile.ZipFile) -> str:
    (info,) = {n.split("/")[0] for n in archive.namelist() if n.split("/")[0].endswith(".dist-info")}
    return info


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    pytest.importorskip("setuptools", minversion="70.1")  # builds wheels without the wheel package
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "tome", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    run = subprocess.run(
        [*command, "--quiet", str(src), "-w", str(out)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (path,) = out.glob("tome_merging-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_every_module_and_the_package_data_are_in_the_wheel(wheel):
    names = set(wheel.namelist())
    modules = [p.relative_to(ROOT).as_posix() for p in _source_files()]
    assert len(modules) > 50
    assert [m for m in modules if m not in names] == []
    data = PACKAGE / "tools" / "data"
    photos = sorted(p.relative_to(ROOT).as_posix() for p in data.glob("*.jpg"))
    assert len(photos) == 3  # what tome.tools.data.demo_images() gives (its doctest)
    assert [f for f in [*photos, "tome/tools/data/LICENSE.txt"] if f not in names] == []
    for name in photos:  # whole files, not pointers or empty placeholders
        assert wheel.read(name) == (ROOT / name).read_bytes()
    # Nothing else: no tests, benchmarks, experiments or caches.
    assert {name.split("/")[0] for name in names} == {"tome", _dist_info(wheel)}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_wheel_declares_the_command_and_requires_torch_and_numpy(wheel):
    info = _dist_info(wheel)
    entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert "[console_scripts]" in entry_points and "tome = tome.cli.main:console" in entry_points
    metadata = wheel.read(f"{info}/METADATA").decode().splitlines()
    required = [line for line in metadata if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert required == ["Requires-Dist: torch>=2.1", "Requires-Dist: numpy"]
    extras = {line.split(":", 1)[1].strip() for line in metadata if line.startswith("Provides-Extra:")}
    assert {"demo", "embed", "dev"} <= extras


def test_every_folder_of_modules_is_a_package():
    """A folder without ``__init__.py`` is a namespace package: the wheel still holds it, but
    pkgutil.walk_packages skips it and pytest's doctest collection imports its modules under
    their bare names (``tome/adapters/open_clip.py`` as ``open_clip``, clashing with open_clip)."""
    folders = sorted({p.parent for p in _source_files()})
    assert [str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()] == []
