"""Shared fixtures: paths to the real model and photos in ../shared (present in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DINOV2_DIR = SHARED / "models" / "dinov2-small-saliency"
IMAGES_DIR = SHARED / "images" / "imagenet-samples"


@pytest.fixture(scope="session")
def dinov2_dir() -> Path:
    if not (DINOV2_DIR / "model.safetensors").exists():
        pytest.skip(f"real DINOv2 weights not found at {DINOV2_DIR}")
    return DINOV2_DIR


@pytest.fixture(scope="session")
def images_dir() -> Path:
    if not IMAGES_DIR.is_dir():
        pytest.skip(f"sample photos not found at {IMAGES_DIR}")
    return IMAGES_DIR
