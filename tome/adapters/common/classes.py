"""Classes found by name through the MRO, so that no adapter imports its framework to recognize
the framework's modules.

>>> import torch
>>> class_names(torch.nn.Linear(2, 2))
['Linear', 'Module', 'object']
>>> class_names(torch.nn.Linear(2, 2), library="torch")
['Linear', 'Module']
>>> library_class(torch.nn.ReLU(), ("Linear", "ReLU"), "torch")
'ReLU'
>>> find_known([None, torch.nn.ReLU()], {"Module": "any module"})
(ReLU(), 'any module')
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from typing import TypeVar

import torch.nn as nn

__all__ = ["class_names", "find_known", "library_class"]

T = TypeVar("T")


def class_names(obj: object, library: str | None = None) -> list[str]:
    """The names of the classes in ``type(obj).__mro__`` (only those defined in ``library``'s
    modules, when given), the object's own class first."""
    return [
        cls.__name__
        for cls in type(obj).__mro__
        if library is None or cls.__module__.startswith(library + ".")
    ]


def library_class(obj: object, names: Container[str], library: str) -> str | None:
    """The first class of ``type(obj).__mro__`` that ``library`` defines under one of ``names``,
    or ``None``."""
    return next((name for name in class_names(obj, library) if name in names), None)


def find_known(candidates: Iterable[object], known: Mapping[str, T]) -> tuple[nn.Module, T] | None:
    """The first of ``candidates`` (e.g. a model, then its ``base_model``) that is a module with a
    class ``known`` names (nearest in its MRO first), and that class's entry; else ``None``."""
    for candidate in candidates:
        if isinstance(candidate, nn.Module):
            for name in class_names(candidate):
                if name in known:
                    return candidate, known[name]
    return None
