"""``tome.patch`` / ``tome.unpatch``: token merging for models the user already has.

Adapters are found by class name through the model's MRO (and the module the class comes
from), so a framework the user has not imported is never imported here. Each adapter lives in
its own module and exposes ``apply(model, handle_kwargs) -> ToMeHandle``.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable

import torch.nn as nn

from tome.patch.handle import ToMeHandle, check_options
from tome.schedule import Schedule, check_schedule

__all__ = ["ToMeHandle", "add_hook", "patch", "replace_method", "supported_families", "unpatch"]

# (family, module prefix of the framework's classes, adapter module, supported class names)
_ADAPTERS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("timm", "timm.", "tome.patch.timm", ("VisionTransformer",)),
    (
        "transformers",
        "transformers.",
        "tome.patch.transformers",
        (
            "ViTModel",
            "ViTForImageClassification",
            "Dinov2Model",
            "Dinov2ForImageClassification",
            "Dinov2WithRegistersModel",
            "Dinov2WithRegistersForImageClassification",
            "CLIPVisionModel",
            "CLIPVisionModelWithProjection",
            "CLIPForImageClassification",
        ),
    ),
    ("torchvision", "torchvision.", "tome.patch.torchvision", ("VisionTransformer",)),
)


def supported_families() -> str:
    """One line per supported framework, listing the model classes ``patch`` accepts."""
    return "\n".join(f"  {family}: {', '.join(names)}" for family, _, _, names in _ADAPTERS)


def _find_adapter(model: nn.Module) -> tuple[str, str] | None:
    for cls in type(model).__mro__:
        for family, prefix, adapter, names in _ADAPTERS:
            if cls.__name__ in names and cls.__module__.startswith(prefix):
                return family, adapter
    return None


def patch(
    model: nn.Module,
    r: Schedule = 16,
    *,
    prop_attn: bool = True,
    unmerge_output: bool = False,
    metric: str = "keys",
    energy: bool | float = False,
    unmerge_detail: bool = False,
    mode: str = "mean",
    size_penalty: float = 0.0,
    keep_outliers: int = 0,
) -> nn.Module:
    """Make ``model`` merge tokens in every transformer block, in place; returns ``model``.

    Important args:
        r: tokens removed per block: an int, a per-layer list, or ``(r, inflection)`` (a ramp
            as in ToMe: ``(16, -1.0)`` removes 32 tokens in the first block, 0 in the last).
            A block never removes more than half its unprotected tokens. Settable later as
            ``model.tome.r``.

    Args to tinker with:
        prop_attn: proportional attention (add log of each token's size to the attention
            logits), as in ToMe.
        unmerge_output: return the model's token outputs (``last_hidden_state``,
            ``forward_features``, ...) at the original length, so dense heads work unchanged.
        metric: the features whose cosine similarity decides what merges: ``"keys"`` (the
            attention keys averaged over heads, as in ToMe) or ``"x"`` (the hidden states
            being merged).
        energy: protect informative/isolated tokens, after PiToMe (Tran et al., "Accelerating
            Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024): ``True`` lets
            only the ``2 r`` tokens of highest energy (most redundant) merge in a block; a float
            ``>= 2`` sets that factor. Costs one N x N similarity per merging block.
        unmerge_detail: after the last block, give every original token back its own deviation
            from its group's mean at the time it was merged (a residual-stream correction,
            free in FLOPs, O(B N0 C) memory); the token output then always has the original
            length. Improves dense outputs; pooled/CLS outputs are unchanged.
        mode: ``"mean"`` (ToMe's size-weighted average) or ``"mlerp"`` (the mean rescaled to
            the largest norm of its group, ToFu: Kim et al., WACV 2024).
        size_penalty: ``beta >= 0``: an edge's score loses ``beta * log(size)`` of each of its
            two tokens, so large groups grow more slowly (0: ToMe).
        keep_outliers: ``k``: in every merging block the ``k`` unprotected tokens of largest
            hidden-state norm are never merged. ViTs without registers keep global information
            in a few high-norm tokens (Darcet et al., "Vision Transformers Need Registers",
            ICLR 2024); averaging them away hurts the class token.

    Patching twice is one patch with the latest arguments; :func:`unpatch` restores the
    original behaviour exactly. Supported: timm ``VisionTransformer``; transformers ViT,
    DINOv2 (with registers), CLIP vision; torchvision ``VisionTransformer``.

    Example:
        >>> import timm, tome
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> model = tome.patch(model, r=8)
        >>> model.tome.r
        8
        >>> tome.unpatch(model) is model
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    check_schedule(r)
    options = dict(
        prop_attn=prop_attn,
        unmerge_output=unmerge_output,
        metric=metric,
        energy=energy,
        unmerge_detail=unmerge_detail,
        mode=mode,
        size_penalty=size_penalty,
        keep_outliers=keep_outliers,
    )
    check_options(
        **{k: v for k, v in options.items() if k not in ("prop_attn", "unmerge_output", "unmerge_detail")}
    )
    found = _find_adapter(model)
    if found is None:
        raise TypeError(
            f"model: tome.patch does not support {type(model).__module__}.{type(model).__qualname__}. "
            f"Supported model classes:\n{supported_families()}"
        )
    family, adapter = found
    module = importlib.import_module(adapter)
    previous = model.__dict__.get("tome")
    unpatch(model)
    try:
        handle: ToMeHandle = module.apply(model, r=r, **options)
    except Exception:
        # Adapters check everything before changing the model; put the earlier patch back so a
        # bad argument leaves the model as it was.
        if isinstance(previous, ToMeHandle):
            patch(model, previous.r, **previous.options())
        raise
    handle.family = family
    model.tome = handle
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original forwards, no hooks, no ``model.tome``. No-op if unpatched."""
    handle = model.__dict__.get("tome")
    if isinstance(handle, ToMeHandle):
        handle._restore()
        del model.tome
    return model


def replace_method(module: nn.Module, name: str, method: Callable[..., object], handle: ToMeHandle) -> None:
    """Give one ``module`` instance a new method ``name`` (``method(module, *args, **kwargs)``),
    shadowing the class's; ``unpatch`` deletes it again, which brings back the class's own."""
    if name in module.__dict__:
        raise RuntimeError(f"tome: {type(module).__name__}.{name} is already replaced on this instance")
    setattr(module, name, types.MethodType(method, module))
    handle.on_unpatch(lambda: module.__dict__.pop(name, None))


def add_hook(hook_handle: object, handle: ToMeHandle) -> None:
    """Remember a ``torch.utils.hooks.RemovableHandle`` so that ``unpatch`` removes it."""
    handle.on_unpatch(hook_handle.remove)
