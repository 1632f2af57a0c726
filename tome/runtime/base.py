"""``PatchHandle``: what every patched model's handle (``model.tome``) shares, whatever its kind.

A handle holds the model's settings, never per-pass state; this base class gives every kind of
handle (the token handle :class:`~tome.runtime.handle.ToMeHandle`, the diffusion handle
:class:`~tome.adapters.common.diffusion.DiffusionHandle`):

- the family's declared options (:mod:`tome.runtime.options`): checked, stored, settable, and
  listed by :meth:`~PatchHandle.patch_options`;
- what patching installs (:meth:`~PatchHandle.install_method`, hooks) as data, undone by
  ``tome.unpatch``, all or nothing (:meth:`~PatchHandle.installing`);
- copies and pickles: per-pass bookkeeping (the attributes a class names in ``_transient``,
  built by ``_init_transient``) is never copied, and a pickle carries the patch format it was
  written in (:mod:`tome.runtime.install`);
- a ``repr`` with the family and the options.

``isinstance(module.__dict__.get("tome"), PatchHandle)`` is how to tell that ``module`` is
patched, whatever its kind.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from tome.core.threads import StepThreads
from tome.runtime.install import FORMAT, InstalledHook, InstalledMethod, check_format, refuse_script
from tome.runtime.options import declared_options, set_options

__all__ = ["PatchHandle"]


class PatchHandle:
    """The settings of a patched model, reachable as ``model.tome``, and what patching changed.

    Attributes:
        num_layers: number of patched blocks.
        family: the library of the patched model (``"timm"``, ``"diffusers"``, ...).

    The family's options (:class:`~tome.runtime.options.Option` attributes of a subclass) are
    keywords of the constructor, checked, and settable attributes.
    """

    # Attributes that belong to the calls running now (built by _init_transient): never copied,
    # pickled or shared with a copy. Each class names its own; those of its bases count too.
    _transient: tuple[str, ...] = ("_threads",)

    def __init__(self, num_layers: int, *, family: str = "", **options: object) -> None:
        declared = declared_options(type(self))
        unknown = sorted(set(options) - set(declared))
        if unknown:
            raise TypeError(f"{unknown[0]}: not an option of {type(self).__name__}")
        set_options(self, declared.values(), options)
        self.num_layers = num_layers
        self.family = family
        # What patch changed, as data (module, attribute or hook id): undone by unpatch; deep
        # copies and pickles carry it along with the modules it names.
        self._installed: list[tuple[str, nn.Module, object]] = []
        self._init_transient()

    def _init_transient(self) -> None:
        """Build the per-call attributes named in ``_transient`` (after construction, unpickling
        and unpatching); a subclass that names more builds them after calling this."""
        self._threads = StepThreads()  # per thread: merge steps alone or on torch's threads

    # -- merge steps on the CPU ----------------------------------------------------------------

    def merge_step(self, like: torch.Tensor) -> contextlib.AbstractContextManager:
        """The context of one merge step on ``like`` (the tokens it merges): alone on the calling
        thread or on torch's threads, whichever this thread's timings say is faster
        (:class:`~tome.core.threads.StepThreads`); nothing while compiling (the compiled graph
        has its own threading)."""
        return contextlib.nullcontext() if torch.compiler.is_compiling() else self._threads.step(like)

    def merge_step_part(self, like: torch.Tensor) -> contextlib.AbstractContextManager:
        """The context of work of a merge step done outside :meth:`merge_step` (the similarity
        features, the merge of a plan made earlier): the way this thread's latest step took."""
        return contextlib.nullcontext() if torch.compiler.is_compiling() else self._threads.follow(like)

    # -- copies and pickles ------------------------------------------------------------------

    def __getstate__(self) -> dict:
        from tome import __version__

        transient = {name for klass in type(self).__mro__ for name in vars(klass).get("_transient", ())}
        state = {k: v for k, v in self.__dict__.items() if k not in transient}
        return {"format": FORMAT, "tome_version": __version__, "state": state}

    def __setstate__(self, saved: dict) -> None:
        if not isinstance(saved, dict) or "format" not in saved:
            check_format(None, "unknown")
        check_format(saved["format"], saved.get("tome_version", "unknown"))
        self.__dict__.update(saved["state"])
        self._init_transient()

    # -- settings ------------------------------------------------------------------------------

    def patch_options(self) -> dict:
        """The keyword options of :func:`tome.patch` this handle has now (for patching again)."""
        return {name: getattr(self, name) for name in declared_options(type(self))}

    # -- installing (used by adapters) ---------------------------------------------------------

    def install_method(self, module: nn.Module, name: str, function, *bound: object) -> None:
        """Give one ``module`` instance a method ``name`` = ``function(module, *bound, ...)``
        (a module-level function), shadowing the class's; ``unpatch`` deletes it again."""
        if name in module.__dict__:
            raise RuntimeError(
                f"tome: {type(module).__name__}.{name} is already replaced on this instance (is a "
                "model containing this one already patched by tome? unpatch it first)"
            )
        setattr(module, name, InstalledMethod(function, module, *bound))
        self._installed.append(("method", module, name))
        if "__prepare_scriptable__" not in module.__dict__:
            module.__prepare_scriptable__ = InstalledMethod(refuse_script, module)
            self._installed.append(("method", module, "__prepare_scriptable__"))

    def install_pre_hook(self, module: nn.Module, function, *bound: object) -> None:
        """Register the forward pre-hook ``function(*bound, module, args, kwargs)`` on ``module``
        (it sees keyword arguments too); ``unpatch`` removes it."""
        hook = module.register_forward_pre_hook(InstalledHook(function, *bound), with_kwargs=True)
        self._installed.append(("pre_hook", module, hook.id))

    def install_hook(self, module: nn.Module, function, *bound: object) -> None:
        """Register the forward hook ``function(*bound, module, args, output)`` on ``module``;
        ``unpatch`` removes it."""
        hook = module.register_forward_hook(InstalledHook(function, *bound))
        self._installed.append(("hook", module, hook.id))

    def _restore(self) -> None:
        while self._installed:
            kind, module, key = self._installed.pop()
            if kind == "method":
                module.__dict__.pop(key, None)
            elif kind == "pre_hook":
                module._forward_pre_hooks.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
            else:
                for hooks in (
                    module._forward_hooks,
                    module._forward_hooks_with_kwargs,
                    module._forward_hooks_always_called,
                ):
                    hooks.pop(key, None)
        self._init_transient()

    def installing(self) -> _Installing:
        """Adapters make their changes inside ``with handle.installing():``: if one fails, the
        ones already made are undone, so a failed patch never leaves a hook or a forward behind."""
        return _Installing(self)

    def __repr__(self) -> str:
        options = "".join(f", {name}={getattr(self, name)!r}" for name in declared_options(type(self)))
        return f"{type(self).__name__}(family={self.family!r}, blocks={self.num_layers}{options})"


class _Installing:
    def __init__(self, handle: PatchHandle) -> None:
        self.handle = handle

    def __enter__(self) -> PatchHandle:
        return self.handle

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.handle._restore()
