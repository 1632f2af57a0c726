"""The inputs of ``tome embed``: the items to embed (every image under some folders, or every
non-empty line of some text files), each once. Decoding an image is
:mod:`tome.tools.embed.decode`'s.

>>> from tome.tools.data import demo_images
>>> items = image_items(demo_images())
>>> len(items), items[0].key == items[0].path
(3, True)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tome.tools.errors import UserError

__all__ = ["TEXT_SUFFIXES", "Item", "image_items", "is_text_job", "text_items"]

TEXT_SUFFIXES = (".txt", ".text")


@dataclass(frozen=True)
class Item:
    """One row to embed: ``key`` (the row's ``path`` or ``id``), the file to read, and for texts
    the text."""

    key: str
    path: str
    text: str | None = None


def image_items(inputs: Iterable[str | Path]) -> list[Item]:
    """Every image under ``inputs`` (files, and folders searched recursively), each once, keyed
    by its absolute path. :class:`UserError` for a missing path or a folder with no images."""
    from tome.tools.images import find_images

    paths, problems = find_images(inputs)
    if problems:
        raise UserError(problems[0])
    items: dict[str, Item] = {}
    for path in paths:
        key = os.path.abspath(path)
        items.setdefault(key, Item(key, key))
    if not items:
        raise UserError("no images found")
    return list(items.values())


def text_items(inputs: Iterable[str | Path]) -> list[Item]:
    """One item per non-empty line of the UTF-8 text files ``inputs``, keyed
    ``ABSOLUTE_PATH:LINE`` (lines counted from 1). :class:`UserError` for a missing file, a
    folder, a file that is not UTF-8 or has no text."""
    items: dict[str, Item] = {}
    for given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            raise UserError(f"{path}: no such file")
        if path.is_dir():
            raise UserError(f"{path}: a folder; texts come from text files (one text a line)")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        except OSError as error:
            raise UserError(f"{path}: cannot read it: {error.strerror or error}") from None
        absolute = os.path.abspath(path)
        found = 0
        for number, line in enumerate(lines, 1):
            if line.strip():
                key = f"{absolute}:{number}"
                items.setdefault(key, Item(key, absolute, line.strip()))
                found += 1
        if not found:
            raise UserError(f"{path}: no texts in it (empty lines are skipped)")
    if not items:
        raise UserError("no text files given")
    return list(items.values())


def is_text_job(inputs: Sequence[str | Path], model: str | None, texts: bool | None) -> bool:
    """Texts when asked (``texts``), when the model is a ``text:`` spec, or when no model is
    given and every input is a ``.txt`` file."""
    from tome.tools.models.text_loading import is_text_spec

    if texts is not None:
        return bool(texts)
    if model is not None:
        return is_text_spec(model)
    return bool(inputs) and all(Path(p).suffix.lower() in TEXT_SUFFIXES and Path(p).is_file() for p in inputs)
