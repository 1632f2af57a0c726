"""The call plumbing every vision-language adapter shares: is this call a prompt tome can
merge, the prompt shortened to match the merged images, the rewritten call, and the install of
``generate`` / the forward hooks / proportional attention on a model.

A family supplies one module-level function, its *rewrite*: ``rewrite(model, handle, ids,
kwargs) -> (rewritten keyword arguments, new width) | None`` (``None``: run the call as it
is). Typically it checks :func:`is_prompt`, computes and merges its images' features (its own
part), then returns :func:`rewritten_call` of :func:`shorten_call`. :func:`install_visual`
installs it as the model's ``generate`` and forward pre-hook.

>>> ids = torch.tensor([[5, 9, 9, 9, 9, 6]])
>>> is_prompt(VisualHandle(visual_tokens=2), ids, {"input_ids": ids, "pixel_values": torch.zeros(1)})
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from tome.adapters.common.vlm import (
    BIAS,
    Shortened,
    VisualHandle,
    forward_done,
    forward_reduced,
    generate_reduced,
    install_prop_attn,
    shorten_prompts,
    size_bias,
)

__all__ = [
    "Rewrite",
    "cache_length",
    "install_visual",
    "is_prompt",
    "require",
    "rewritten_call",
    "shorten_call",
]

Rewrite = Callable[[nn.Module, VisualHandle, object, dict], "tuple[dict, int] | None"]


def cache_length(kwargs: dict) -> int:
    """Tokens already in the cache a call continues (0: a prompt of its own)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 0


def is_prompt(handle: VisualHandle, ids: object, kwargs: dict, pixels: str = "pixel_values") -> bool:
    """Whether a call (``input_ids`` given as ``ids``) is one tome merges: the settings merge,
    ``ids`` is ``(B, L)``, ``kwargs[pixels]`` is given, no ``inputs_embeds`` or pre-computed
    ``mm_encoder_outputs``, no cache to continue, and an ``attention_mask`` (if any) of the
    prompt's own shape (not a 4-D one, nor one that covers a cache)."""
    if (
        not handle.merges()
        or not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or kwargs.get(pixels) is None
        or kwargs.get("inputs_embeds") is not None
        or kwargs.get("mm_encoder_outputs") is not None
        or cache_length(kwargs) > 0
    ):
        return False
    mask = kwargs.get("attention_mask")
    return mask is None or (isinstance(mask, torch.Tensor) and mask.shape == ids.shape)


def shorten_call(
    model: nn.Module,
    handle: VisualHandle,
    ids: torch.Tensor,
    kwargs: dict,
    per_token: Sequence[str],
    before: Sequence[int],
    after: Sequence[int],
    sources: Sequence[torch.Tensor] | None,
    *,
    bias: torch.Tensor | None = None,
) -> Shortened | None:
    """The prompt of a call shortened so that image ``i`` keeps ``after[i]`` of its
    ``before[i]`` placeholders (``model.config.image_token_id``), with ``attention_mask`` and
    the ``per_token`` inputs of the prompt's shape; the key bias of proportional attention under
    :data:`BIAS` when ``handle.visual_prop_attn`` (``bias``, or the one ``sources`` give).
    ``None`` when the placeholders do not match the images: the caller runs the call as it is,
    so that the model raises its own error."""
    placeholder = model.config.image_token_id
    if int((ids == placeholder).sum()) != sum(before):
        return None
    extra = {
        name: kwargs[name]
        for name in per_token
        if isinstance(kwargs.get(name), torch.Tensor) and kwargs[name].shape == ids.shape
    }
    if handle.visual_prop_attn:
        extra[BIAS] = bias if bias is not None else size_bias(ids, placeholder, sources, after)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    return shorten_prompts(
        ids,
        kwargs.get("attention_mask"),
        placeholder,
        before,
        after,
        extra,
        pad_id=pad if isinstance(pad, int) else 0,
    )


def rewritten_call(
    kwargs: dict, shortened: Shortened, encoder_outputs: dict, drop: Sequence[str] = ("pixel_values",)
) -> tuple[dict, int]:
    """A call's keyword arguments with the shortened prompt (the key bias too, under
    :data:`BIAS`: the installed generate / pre-hook take it out), ``encoder_outputs`` as
    ``mm_encoder_outputs``, and without ``drop`` (the pixels the features came from); and the
    new width."""
    rewritten = {k: v for k, v in kwargs.items() if k not in (*drop, "input_ids", "inputs")}
    rewritten.update(shortened.tensors)
    rewritten["mm_encoder_outputs"] = encoder_outputs
    return rewritten, shortened.width


def require(model: nn.Module, family: str, *, methods: Sequence[str] = (), ints: Sequence[str] = ()) -> None:
    """A clear ``TypeError`` unless ``model`` has the ``methods`` and integer config fields
    ``ints`` its adapter needs."""
    config = getattr(model, "config", None)
    if all(callable(getattr(model, name, None)) for name in methods) and all(
        isinstance(getattr(config, name, None), int) and not isinstance(getattr(config, name), bool)
        for name in ints
    ):
        return
    needs = [f"{name}()" for name in methods] + [f"config.{name}" for name in ints]
    raise TypeError(f"tome: expected {family} model with {', '.join(needs)}, got a {type(model).__name__}")


def _installed_generate(
    model: nn.Module, handle: VisualHandle, rewrite: Rewrite, told: bool, *args, **kwargs
):
    flag = {"generating": True} if told else {}
    return generate_reduced(
        model, args, kwargs, lambda ids, given: rewrite(model, handle, ids, given, **flag), handle
    )


def _installed_pre_hook(
    handle: VisualHandle,
    rewrite: Rewrite,
    told: bool,
    runner: Callable,
    model: nn.Module,
    args: tuple,
    kwargs: dict,
):
    flag = {"generating": False} if told else {}
    return runner(model, args, kwargs, lambda ids, given: rewrite(model, handle, ids, given, **flag), handle)


def install_visual(
    handle: VisualHandle,
    model: nn.Module,
    rewrite: Rewrite,
    language_model: nn.Module,
    prop_attn: Callable[[VisualHandle, nn.Module], None] = install_prop_attn,
    *,
    runner: Callable = forward_reduced,
    tell_generating: bool = False,
) -> VisualHandle:
    """Install ``rewrite`` (a module-level function: the patched model pickles) on ``model`` as
    its ``generate`` (an instance method shadowing the class's) and a forward pre-hook (so that
    ``forward``'s signature, which ``generate`` inspects, stays the class's), with the forward
    hook that clears a direct call's bias and proportional attention on ``language_model``'s
    layers; all of it undone by ``tome.unpatch``. ``runner``: what the forward pre-hook runs
    (:func:`~tome.adapters.common.vlm.forward_reduced`, or for families with videos
    :func:`~tome.adapters.common.video.forward_reduced_videos`); ``tell_generating``: ``rewrite``
    takes ``generating=`` (whether the call comes from ``generate()``). Returns ``handle``."""
    with handle.installing():
        handle.install_method(model, "generate", _installed_generate, handle, rewrite, tell_generating)
        handle.install_pre_hook(model, _installed_pre_hook, handle, rewrite, tell_generating, runner)
        handle.install_hook(model, forward_done, handle)
        prop_attn(handle, language_model)
    return handle
