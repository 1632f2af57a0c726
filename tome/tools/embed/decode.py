"""Decoding an image file into the pixels a model sees, with PIL and numpy only (no torch:
:mod:`tome.tools.images` uses :func:`resized` too). ``tome embed`` decodes in threads beside the
model, locally and in each Ray actor (:mod:`tome.tools.embed.local`).

>>> from tome.tools.data import demo_images
>>> pixels, reason = decode_image(str(demo_images()[0]), 32, None)
>>> pixels.shape, pixels.dtype.name, reason
((3, 32, 32), 'uint8', None)
>>> decode_image(__file__, 32, None)[1].startswith("cannot read it as an image")
True
"""

from __future__ import annotations

import numpy as np

__all__ = ["decode_image", "resized"]


def resized(image, size: int, crop_pct: float | None) -> np.ndarray:
    """One PIL RGB image -> (size, size, 3) uint8 numpy array: resized to ``size`` x ``size``
    (``crop_pct`` None), or resized so that the centre crop of ``size`` is ``crop_pct`` of the
    shorter side, then centre-cropped (what :func:`tome.tools.images.to_unit` gives, times 255)."""
    from PIL import Image

    if crop_pct is None:
        image = image.resize((size, size), Image.BICUBIC)
    else:
        scale = size / crop_pct / min(image.size)
        w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).copy()


def decode_image(path: str, size: int, crop_pct: float | None) -> tuple[np.ndarray | None, str | None]:
    """``(pixels, None)``: the image as the model sees it, a (3, size, size) uint8 array (see
    :func:`resized`); or ``(None, reason)`` when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except Exception as error:  # a corrupt file may raise anything from PIL's decoders
        message = (str(error).splitlines() or [""])[0][:200]
        return None, f"cannot read it as an image ({type(error).__name__}: {message})"
    # uint8 until the model's side: 4x less to hold (or to send to a Ray actor)
    return resized(rgb, size, crop_pct).transpose(2, 0, 1), None
