"""Models pickled by tome 0.1 name modules under ``tome.patch`` (patch format 1), which the
redesign moved to ``tome.runtime`` / ``tome.adapters``: loading one says which tome wrote it
instead of failing with a bare ``ModuleNotFoundError``. Imports nothing heavy (``import tome``
registers it)."""

from __future__ import annotations

import importlib.abc
import sys

__all__ = ["LegacyLayoutFinder", "register_legacy_finder"]


class LegacyLayoutFinder(importlib.abc.MetaPathFinder):
    """Answers imports of ``tome.patch`` and ``tome.patch.*`` with the format error of
    :func:`tome.runtime.install.check_format`; every other import passes by. Stateless."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname == "tome.patch" or fullname.startswith("tome.patch."):
            from tome.runtime.install import check_format

            check_format(1, "0.1.0")
        return None


def register_legacy_finder() -> None:
    """Put one :class:`LegacyLayoutFinder` on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(finder, LegacyLayoutFinder) for finder in sys.meta_path):
        sys.meta_path.append(LegacyLayoutFinder())
