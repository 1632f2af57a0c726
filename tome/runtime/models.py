"""``PatchedModels``: ``model.tome`` of a module that holds patched models."""

from __future__ import annotations

import torch.nn as nn

from tome.runtime.base import PatchHandle
from tome.runtime.options import declared_options

__all__ = ["PatchedModels"]


class PatchedModels:
    """``model.tome`` of a module that holds patched models (a ``torch.compile`` /
    ``DataParallel`` / ``DistributedDataParallel`` wrapper, or a user's module).

    Setting ``r``, ``ratio``, ``prop_attn`` or ``unmerge_output`` sets it on every patched model
    inside that has it, a family's option on every one of that family; any other attribute is read from the handle of the only one (with several, read
    ``handles[name]``).

    Attributes:
        models: submodule name -> patched model.
    """

    _SETTINGS = ("r", "ratio", "prop_attn", "unmerge_output")

    def __init__(self, models: dict[str, nn.Module]) -> None:
        object.__setattr__(self, "models", dict(models))

    @property
    def handles(self) -> dict[str, PatchHandle]:
        """Submodule name -> its handle (a :class:`~tome.runtime.handle.ToMeHandle` for token
        models)."""
        return {name: model.tome for name, model in self.models.items()}

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "models":  # pickling and copying probe dunders
            raise AttributeError(name)
        handles = list(self.handles.values())
        if len(handles) == 1:
            return getattr(handles[0], name)
        values = [getattr(h, name) for h in handles]
        if name in self._SETTINGS and all(v == values[0] for v in values):
            return values[0]
        raise AttributeError(
            f"{name}: {len(handles)} models are patched inside this one ({', '.join(self.models)}); read "
            f"model.tome.handles[name].{name}"
        )

    def __setattr__(self, name: str, value) -> None:
        handles = list(self.handles.values())
        family = {option for h in handles for option in declared_options(type(h))}
        if name not in self._SETTINGS and name not in family:
            settable = ", ".join((*self._SETTINGS, *sorted(family - set(self._SETTINGS))))
            raise AttributeError(f"{name}: only {settable} can be set on PatchedModels")
        if name not in self._SETTINGS:
            # A family's own option (text encoders: min_tokens, hidden_weight) goes to the
            # models that have it.
            handles = [h for h in handles if name in declared_options(type(h))]
        else:
            # A shared setting goes to the models whose handle has it (a diffusion model has a
            # ratio, but no prop_attn or unmerge_output).
            handles = [h for h in handles if hasattr(type(h), name)]
            if not handles:
                raise AttributeError(f"{name}: none of the models patched inside this one has this setting")
        for handle in handles:
            setattr(handle, name, value)

    def __repr__(self) -> str:
        return f"PatchedModels({', '.join(f'{n or type(m).__name__}: {m.tome!r}' for n, m in self.models.items())})"
