"""``tome.patch`` / ``tome.unpatch``: token merging for models the user already has.

The model's adapter is found in the registry (:mod:`tome.runtime.registry`) by class name
through the model's MRO (and the module the class comes from), so a framework the user has not
imported is never imported here. Family options (``min_tokens``, tomesd's ``sx``, ...) are the
:class:`~tome.runtime.options.Option` declarations of the adapter's handle class: any of them
is a keyword here, checked before the model changes.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from tome.core.schedule import Schedule, check_ratio, check_schedule
from tome.runtime.base import PatchHandle
from tome.runtime.handle import MergeOptions, PatchedModels, ToMeHandle
from tome.runtime.registry import (
    Adapter,
    adapter_for,
    framework_of,
    option_owners,
    outermost,
    supported_families,
)

__all__ = ["MergeOptions", "PatchedModels", "ToMeHandle", "patch", "supported_families", "unpatch"]


def patch(
    model: nn.Module,
    r: Schedule | None = None,
    *,
    ratio: float | None = None,
    prop_attn: bool = True,
    unmerge_output: bool | None = None,
    metric: str | None = None,
    mode: str = "mlerp",
    unmerge_detail: bool = False,
    keep_outliers: int = 0,
    **family_options: object,
) -> nn.Module:
    """Make ``model`` merge tokens in every transformer block, in place; returns ``model``.

    Important args:
        r: tokens removed per block: an int, a per-layer list, or ``(r, inflection)`` (a ramp
            as in ToMe: ``(16, -1.0)`` removes 32 tokens in the first block, 0 in the last).
            A list shorter than the number of blocks leaves the last blocks at 0. A block
            never removes more than half its unprotected tokens (a warning says when the
            schedule asks for more). Settable later as ``model.tome.r``. Default 16.
        ratio: instead of ``r``: every block removes this fraction (``0 <= ratio < 1``) of
            each row's mergeable tokens (short texts lose few tokens, long ones many). In a
            padded batch every row counts its own real tokens, so its result does not depend
            on the rest of the batch. Settable later as ``model.tome.ratio``.
        unmerge_output: return the model's token outputs (``last_hidden_state``,
            ``forward_features``, ...) at the original length, so dense heads work unchanged.
            Default: ``True`` for text encoders (pooling reads every token with the
            attention mask), ``False`` for vision models. Settable later as
            ``model.tome.unmerge_output``.

    Args to tinker with (defaults: the best measured at equal measured speed on DINOv2-S, see
    the README; ``mode="mean"`` is the original ToMe):
        prop_attn: proportional attention (add log of each token's size to the attention
            logits), as in ToMe. Settable later as ``model.tome.prop_attn``.
        metric: what similarity decides the merges (default: ``"keys"``; ``"head_keys"`` for text
            encoders, measured much better there: benchmarks/text.py): ``"keys"`` (the cosine similarity of the
            keys averaged over heads, ToMe) or ``"head_keys"`` (each head's key cosine
            similarity, averaged over heads: better dense outputs at equal FLOPs, a matching
            product ``heads`` times wider).
        mode: ``"mlerp"`` (the size-weighted mean rescaled to the largest norm among the tokens
            it combines, ToFu: Kim et al., WACV 2024) or ``"mean"`` (ToMe's size-weighted average).
        unmerge_detail: with ``unmerge_output``, give every original token back its own
            deviation from what its group became at each merge (memory O(B N C) per merging
            block during the pass; no FLOPs). Better dense outputs; the class token is unchanged.
        keep_outliers: ``k``: in every merging block the ``k`` unprotected tokens of largest
            hidden-state norm are kept out of the merge, unless a block has to merge more
            tokens than the others can give (ViTs without registers keep global information
            in a few high-norm tokens: Darcet et al., "Vision Transformers Need Registers",
            ICLR 2024).

    Text encoders (transformers BERT-family and ModernBERT, sentence-transformers) also take
    ``min_tokens`` (a text is never merged below this many tokens, so short texts stay whole)
    and ``hidden_weight`` (the share of the hidden states' cosine in the matching similarity,
    beside the keys'); defaults: the best measured on a tuning half of real text
    (``benchmarks/text.py``); settable later on the handle. Errors for other models.

    Diffusion models (a diffusers ``UNet2DConditionModel``: SD 1.x / 2.x, SDXL; a DiT:
    ``PixArtTransformer2DModel``, ``DiTTransformer2DModel``, ``SD3Transformer2DModel``,
    ``FluxTransformer2DModel``; or a ``DiffusionPipeline``, whose ``unet`` or ``transformer`` is
    patched) take tomesd's arguments with tomesd's meanings and defaults, all settable later on
    ``model.tome``: ``ratio`` (default 0.5: the fraction of each merging block's tokens merged
    away), ``max_downsample`` (1, 2, 4 or 8, default 1; SDXL's finest attention level needs 2),
    ``sx``, ``sy`` (default 2, 2: one destination per cell), ``use_rand`` (default True: a random
    destination per cell, chosen by a hash of ``seed``, default 0, the timestep and the block,
    on the timestep's device; never the global RNG), ``merge_attn`` (True), ``merge_crossattn``
    (False), ``merge_mlp`` (False); and tome's own ``match_every`` (blocks of one resolution
    sharing one matching) and ``merge_queries`` (False: ToDo-style, keys and values only); see
    :class:`tome.adapters.diffusers_unet.DiffusionHandle`. Each block merges before those ops and
    unmerges after them, so it returns full-length tokens (see :mod:`tome.adapters.diffusers_unet`).
    ``r`` and the transformer-encoder options above are errors there, and these are errors for
    other models.

    Patching twice is one patch with the latest arguments; :func:`unpatch` restores the
    original behaviour exactly. Supported: timm ``VisionTransformer``; transformers ViT,
    DINOv2 (with registers), CLIP vision; torchvision ``VisionTransformer``. A wrapper
    (``torch.compile(model)``, ``nn.DataParallel``, ``DistributedDataParallel``) or any module
    that holds supported models is accepted too: the outermost supported models inside it are
    patched, ``model.tome`` is then a :class:`PatchedModels`, and ``unpatch`` undoes all of it.
    (A model compiled before patching recompiles on its next call: torch.compile's guards see
    the change.)

    Example:
        >>> import timm, tome
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        >>> model = tome.patch(model, r=8)
        >>> model.tome.r
        8
        >>> tome.unpatch(model) is model
        True
    """
    denoiser = _pipeline_denoiser(model)
    if denoiser is not None:
        # A diffusers pipeline is not an nn.Module: it holds its denoiser (its ``unet``), which
        # is what runs every step; that is patched, the pipeline object itself is not touched.
        patch(
            denoiser, r, ratio=ratio, prop_attn=prop_attn, unmerge_output=unmerge_output, metric=metric,
            mode=mode, unmerge_detail=unmerge_detail, keep_outliers=keep_outliers, **family_options,
        )  # fmt: skip
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if r is not None and ratio is not None:
        raise ValueError(f"r and ratio: give one schedule, not both (got r={r!r}, ratio={ratio!r})")
    if ratio is not None:
        check_ratio(ratio)
    elif r is not None:
        check_schedule(r)
    for name in family_options:
        if not option_owners(name):
            raise TypeError(f"{name}: not an option of tome.patch")
    options = MergeOptions(
        metric=metric or "keys", mode=mode, unmerge_detail=unmerge_detail, keep_outliers=keep_outliers
    )
    settings = {
        "prop_attn": prop_attn, "unmerge_output": unmerge_output, "options": options, "ratio": ratio,
        "default_metric": metric is None, "family_options": family_options,
    }  # fmt: skip
    if adapter_for(model) is not None:
        return _patch_one(model, r, settings)
    if framework_of(model) is not None:
        # A framework's own model that tome does not support (say a masked-image-modeling
        # head): its head may need every token, so its backbone is not patched behind its back.
        raise TypeError(
            f"model: tome.patch does not support {type(model).__module__}.{type(model).__qualname__}. "
            f"Supported model classes:\n{supported_families()}"
        )
    # A wrapper (torch.compile's OptimizedModule, DataParallel, DistributedDataParallel) or a
    # user's module: patch the outermost supported models inside it.
    targets = _supported_inside(model)
    if not targets:
        raise TypeError(
            f"model: tome.patch does not support {type(model).__module__}.{type(model).__qualname__}, "
            f"and none of its {sum(1 for _ in model.modules()) - 1} submodules is a supported model "
            f"(searched the model itself, then every submodule, outermost first). Supported model "
            f"classes:\n{supported_families()}"
        )
    previous = model.__dict__.get("tome")
    if isinstance(previous, PatchHandle):
        unpatch(model)
    done: list[nn.Module] = []
    try:
        for _, target in targets:
            _patch_one(target, r, settings)
            done.append(target)
    except Exception:
        for target in done:
            unpatch(target)
        raise
    # Straight into __dict__: OptimizedModule forwards attribute writes to the module inside.
    model.__dict__["tome"] = PatchedModels(dict(targets))
    return model


def _pipeline_denoiser(model: object) -> nn.Module | None:
    """The denoiser of a diffusers ``DiffusionPipeline`` (its ``unet``, or a DiT pipeline's
    ``transformer``; found by class name, never importing diffusers), or ``None`` if ``model``
    is no pipeline."""
    if not any(
        cls.__name__ == "DiffusionPipeline" and cls.__module__.startswith("diffusers.")
        for cls in type(model).__mro__
    ):
        return None
    for name in ("unet", "transformer"):
        denoiser = getattr(model, name, None)
        if isinstance(denoiser, nn.Module):
            return denoiser
    raise TypeError(
        f"model: tome.patch supports diffusers pipelines whose denoiser (their unet or transformer) "
        f"is a supported model; this {type(model).__name__} has neither"
    )


def _supported_inside(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost submodules of ``model`` that an adapter supports, in module order."""
    return outermost(model, lambda sub: adapter_for(sub) is not None)


def _family_settings(
    adapter: Adapter, model: nn.Module, r: Schedule, settings: dict
) -> tuple[Schedule, dict]:
    """``r`` and the settings ``adapter.apply`` takes: the family's options checked against what
    it declares, its defaults where the user gave none."""
    settings = dict(settings)
    given = settings.pop("family_options")
    declared = adapter.options
    for name in given:
        if name not in declared:
            owners = sorted({a.title for a in option_owners(name)})
            raise TypeError(
                f"{name}: an option of {' and '.join(owners)}, not of "
                f"{type(model).__module__}.{type(model).__qualname__}"
            )
    if not adapter.takes_r:
        return None, _own_schedule(adapter, r, settings, given)
    settings.update(given)
    if settings.pop("default_metric") and "metric" in adapter.defaults:
        # The family's measured best (text encoders: head_keys, benchmarks/text.py).
        settings["options"] = dataclasses.replace(settings["options"], metric=adapter.defaults["metric"])
    if settings["unmerge_output"] is None:
        settings["unmerge_output"] = adapter.defaults.get("unmerge_output", False)
    if r is None:
        r = 0 if settings["ratio"] is not None else 16
    return r, settings


def _own_schedule(adapter: Adapter, r: Schedule, settings: dict, given: dict) -> dict:
    """The options of a family that merges by its own schedule options (diffusion: ``ratio``;
    vision-language models: ``visual_tokens`` / ``visual_ratio``), after refusing ``r`` and the
    token models' settings with an error that names what it takes instead."""
    instead = " or ".join(f"{name}= ({adapter.options[name].doc})" for name in adapter.schedule)
    ratio = settings["ratio"]
    for name, value in (("r", r), ("ratio", None if "ratio" in adapter.schedule else ratio)):
        if value is not None:
            raise TypeError(
                f"{name}: {adapter.title} merge by their own options; pass {instead} (got {name}={value!r})"
            )
    defaults = MergeOptions()
    token_settings = {
        "prop_attn": (settings["prop_attn"], True),
        "unmerge_output": (settings["unmerge_output"], None),
        **{name: (getattr(settings["options"], name), getattr(defaults, name)) for name in vars(defaults)},
    }
    if settings["default_metric"]:
        token_settings.pop("metric")
    for name, (value, default) in token_settings.items():
        if value != default:
            raise TypeError(
                f"{name}: not an option for {adapter.title}; their options are {', '.join(adapter.options)}"
            )
    return {**given, **({"ratio": ratio} if ratio is not None else {})}


def _patch_one(model: nn.Module, r: Schedule, settings: dict) -> nn.Module:
    adapter = adapter_for(model)
    for name, sub in model.named_modules():
        if sub is not model and isinstance(sub.__dict__.get("tome"), PatchHandle):
            raise ValueError(
                f"model: its submodule {name!r} is already patched by tome; call "
                f"tome.unpatch(model.{name}) first, or patch only one of the two"
            )
    r, settings = _family_settings(adapter, model, r, settings)
    previous = model.__dict__.get("tome")
    unpatch(model)
    try:
        handle: PatchHandle = (
            adapter.apply(model, r=r, **settings) if adapter.takes_r else adapter.apply(model, **settings)
        )
    except Exception:
        # Adapters check everything before changing the model; put the earlier patch back so a
        # bad argument leaves the model as it was.
        if isinstance(previous, PatchHandle):
            patch(model, **previous.patch_options())
        raise
    handle.family = adapter.library
    model.__dict__["tome"] = handle
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original forwards, no hooks, no ``model.tome`` (on a wrapper: on every
    model patched inside it; on a diffusers pipeline: on its ``unet``). No-op if unpatched."""
    denoiser = _pipeline_denoiser(model)
    if denoiser is not None:  # a diffusers pipeline (not an nn.Module): its unet was patched
        unpatch(denoiser)
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    handle = model.__dict__.get("tome")
    if isinstance(handle, PatchHandle):
        handle._restore()
        del model.__dict__["tome"]
    elif isinstance(handle, PatchedModels):
        for inner in handle.models.values():
            unpatch(inner)
        del model.__dict__["tome"]
    return model
