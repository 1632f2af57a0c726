"""Image files and pixels: finding and opening images, resizing them as a model sees them,
normalising."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from tome.tools.embed.decode import resized

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "find_images",
    "normalize",
    "open_image",
    "resized",
    "to_unit",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _walk(folder: Path) -> list[Path]:
    """Every file under ``folder``, through symlinked folders too (each real folder once, so a
    link loop ends), named by the path as given (not the link's target)."""
    files: list[Path] = []
    seen: set[str] = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        files.extend(Path(root) / name for name in names if (Path(root) / name).is_file())
    return files


def find_images(inputs: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Expand files and folders (recursively, symlinked folders included) into image paths,
    sorted per folder. Returns ``(paths, problems)``: paths that do not exist or are not images
    are reported, not raised."""
    paths: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in _walk(path) if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(f"{path}: no images in this folder")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return paths, problems


def open_image(path: str | Path):
    """Open an image as RGB PIL image, or return None if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def to_unit(images: Sequence, size: int, crop_pct: float | None) -> torch.Tensor:
    """PIL RGB images -> (B, 3, size, size) float32 in [0, 1]: resized to ``size`` x ``size``
    (``crop_pct`` None), or resized so that the centre crop of ``size`` is ``crop_pct`` of the
    shorter side, then centre-cropped."""
    batch = [torch.from_numpy(resized(image, size, crop_pct)) for image in images]
    return torch.stack(batch).permute(0, 3, 1, 2).float().div_(255)


def normalize(unit: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) pixels in [0, 1] -> normalised with the per-channel ``mean`` and ``std``."""
    m = torch.tensor(mean, dtype=unit.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=unit.dtype).view(1, 3, 1, 1)
    return (unit - m) / s
