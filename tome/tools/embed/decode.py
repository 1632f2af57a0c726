"""Decoding an image file into the pixels a model sees, with PIL and numpy only.

This module imports nothing from tome (nor torch): ``tome embed --ray`` ships its functions to
the Ray tasks that decode images *by value* (:func:`shipped_by_value`), so that a decoding
worker starts without importing tome and torch (2-3 s of one core per worker on a small machine,
taken from the model's actor while it starts). Keep it that way: a function here that used a
tome name would make every decoding worker import tome again.

>>> from tome.tools.data import demo_images
>>> pixels, reason = decode_image(str(demo_images()[0]), 32, None)
>>> pixels.shape, pixels.dtype.name, reason
((3, 32, 32), 'uint8', None)
>>> decode_image(__file__, 32, None)[1].startswith("cannot read it as an image")
True
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

import numpy as np

__all__ = ["decode_batch", "decode_image", "resized", "shipped_by_value"]


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


def decode_batch(batch: dict, size: int, crop_pct: float | None) -> dict:
    """A batch of ``path`` -> ``pixels`` (B, 3, size, size) uint8, an ``error`` string per row
    (``""`` when read) and the seconds each took (``decode_s``); ``key`` passes through.

    >>> from tome.tools.data import demo_images
    >>> out = decode_batch({"key": np.array(["a"]), "path": np.array([str(demo_images()[0])])}, 8, 0.875)
    >>> out["pixels"].shape, list(out["error"])
    ((1, 3, 8, 8), [''])
    """
    paths = batch["path"]
    pixels = np.zeros((len(paths), 3, size, size), dtype=np.uint8)
    errors, seconds = [], np.zeros(len(paths))
    for i, path in enumerate(paths):
        start = time.perf_counter()
        found, reason = decode_image(str(path), size, crop_pct)
        seconds[i] = time.perf_counter() - start
        if found is not None:
            pixels[i] = found
        errors.append(reason or "")
    return {
        "key": batch["key"],
        "pixels": pixels,
        "error": np.array(errors, dtype=object),
        "decode_s": seconds,
    }


@contextlib.contextmanager
def shipped_by_value() -> Iterator[None]:
    """While inside, cloudpickle (Ray's) pickles this module's functions by value, not as
    ``tome.tools.embed.decode.NAME`` references that the unpickling worker would import (and with
    them tome and torch). Undone on exit: cloudpickle's registry is process-wide (so when another
    job in this process registered it already, that job undoes it).

    >>> import pytest; cloudpickle = pytest.importorskip("ray.cloudpickle")
    >>> with shipped_by_value(), shipped_by_value():
    ...     __name__ in cloudpickle.list_registry_pickle_by_value()
    True
    >>> __name__ in cloudpickle.list_registry_pickle_by_value()
    False
    """
    from ray import cloudpickle

    if __name__ in cloudpickle.list_registry_pickle_by_value():
        yield
        return
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
