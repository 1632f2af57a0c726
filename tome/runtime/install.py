"""What ``tome.patch`` installs on a model's modules, and how ``unpatch`` takes it away.

Everything installed is a plain picklable object (no closures, lambdas or bound methods of
local functions), so a patched model can be deep-copied, pickled and ``torch.save``-d whole:

- :class:`InstalledMethod` shadows one method of one module instance (``block.forward``);
  it calls a module-level function with the module and a few bound arguments;
- :class:`InstalledHook` is a forward hook calling a module-level function.

Each change is recorded as data (the module, the attribute name or hook id) on the handle, so
``unpatch`` of a copy undoes the copy's changes and never touches the original.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch.nn as nn

__all__ = [
    "FORMAT",
    "InstalledHook",
    "InstalledMethod",
    "check_format",
    "qualified_name",
]

# Version of what a pickled patched model holds (the handle's state and these objects); raise it
# when their meaning changes, so an older tome refuses a newer file with a clear message.
# 2: the layout of tome 0.1 after the redesign (tome.runtime, tome.adapters); format 1 files name
# modules under tome.patch, which no longer exists (see tome.runtime.legacy).
FORMAT = 2


def _version() -> str:
    from tome import __version__

    return __version__


def check_format(saved_format: object, saved_version: object) -> None:
    """Raise a clear error if a pickled patched model was written in a format this tome cannot
    read."""
    if saved_format != FORMAT:
        raise RuntimeError(
            f"tome: this patched model was saved by tome {saved_version} (patch format {saved_format}); "
            f"tome {_version()} reads patch format {FORMAT}. Load it with tome {saved_version}, or "
            "save the unpatched model (tome.unpatch) and patch it again after loading"
        )


def qualified_name(function: Callable) -> str:
    """``module:qualname`` of a module-level function."""
    return f"{function.__module__}:{function.__qualname__}"


def _resolve(name: str, saved_format: object, saved_version: object) -> Callable:
    check_format(saved_format, saved_version)
    module_name, _, attribute = name.partition(":")
    try:
        function = importlib.import_module(module_name)
        for part in attribute.split("."):
            function = getattr(function, part)
    except (ImportError, AttributeError) as error:
        raise RuntimeError(
            f"tome: this patched model was saved by tome {saved_version} and needs {name}, which "
            f"tome {_version()} does not have ({error}). Load it with tome {saved_version}, or save "
            "the unpatched model (tome.unpatch) and patch it again after loading"
        ) from None
    return function


def _load_method(saved_format, saved_version, name, module, bound) -> InstalledMethod:
    return InstalledMethod(_resolve(name, saved_format, saved_version), module, *bound)


def _load_hook(saved_format, saved_version, name, bound) -> InstalledHook:
    return InstalledHook(_resolve(name, saved_format, saved_version), *bound)


class InstalledMethod:
    """``module.<name>(*args)`` replaced by ``function(module, *bound, *args)``.

    ``function`` must be a module-level function (so it pickles by name)."""

    def __init__(self, function: Callable, module: nn.Module, *bound: object) -> None:
        self.function = function
        self.module = module
        self.bound = bound

    def __call__(self, *args, **kwargs):
        return self.function(self.module, *self.bound, *args, **kwargs)

    def __reduce__(self):
        return (_load_method, (FORMAT, _version(), qualified_name(self.function), self.module, self.bound))

    def __repr__(self) -> str:
        return f"<tome {qualified_name(self.function)} of {type(self.module).__name__}>"


class InstalledHook:
    """A forward hook ``function(*bound, module, args, output)`` (or pre-hook with keyword
    arguments: ``function(*bound, module, args, kwargs)``), ``function`` module-level."""

    def __init__(self, function: Callable, *bound: object) -> None:
        self.function = function
        self.bound = bound

    def __call__(self, module: nn.Module, args: tuple, third):
        return self.function(*self.bound, module, args, third)

    def __reduce__(self):
        return (_load_hook, (FORMAT, _version(), qualified_name(self.function), self.bound))

    def __repr__(self) -> str:
        return f"<tome hook {qualified_name(self.function)}>"


def refuse_script(module: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of patched modules: ``torch.jit.script`` compiles a module from
    its class's source, which would silently drop the patch."""
    raise TypeError(
        f"tome: torch.jit.script cannot compile a model patched by tome ({type(module).__name__} is "
        "patched): TorchScript compiles the class's own forward and would drop the merging. Use "
        "torch.export.export(model, (inputs,)) or torch.onnx.export(model, (inputs,), dynamo=True) "
        "for deployment, torch.compile(model) for speed, or tome.unpatch(model) before scripting"
    )
