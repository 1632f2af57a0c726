"""Photos bundled for ``tome demo`` (public domain / CC0, from scikit-image; see LICENSE.txt)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["demo_images"]

_HERE = Path(__file__).resolve().parent


def demo_images() -> list[Path]:
    """Paths of the bundled demo photos.

    >>> [p.name for p in demo_images()]
    ['astronaut.jpg', 'chelsea.jpg', 'coffee.jpg']
    """
    return sorted(_HERE.glob("*.jpg"))
