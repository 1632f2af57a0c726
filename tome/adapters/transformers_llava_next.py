"""transformers ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6) and
``LlavaOnevisionForConditionalGeneration``: reduce once, before the decoder (images; OneVision's
videos run unmerged).

Both cut an image into crops (AnyRes) and give the language model, per image, one packed run of
features: the base image's tokens, then the crops' tokens unpadded to the image's aspect ratio,
with the learned ``image_newline`` after every row (OneVision first shrinks a crop grid larger
than ``vision_aspect_ratio`` allows). An image's token count thus depends on its
``image_sizes`` entry: images of one batch differ. Every image reaches the language model as
:func:`~tome.adapters.common.vlm.kept_tokens` of its ``n`` packed tokens (at most
``visual_tokens``, or with ``visual_ratio`` of them merged away): its visual tokens, base and
crops as one set, merged by tome's core to ``k - 1``, then one newline standing for the image's
``R`` newlines (size ``R``), so that the image still ends as the model was trained to see it end
(:func:`tome.adapters.common.anyres.reduce_packed`: why the newlines stay out of the merge). The
prompt's run of ``image_token_id`` placeholders for that image is shortened to match
(:func:`~tome.adapters.common.vlm.shorten_prompts`); each image merges by its own similarities,
so a row's result does not depend on the other images of its batch.

Positions: 1-D RoPE (Llama, Mistral, Qwen2 language models), numbered consecutively over the
shorter sequence, as for LLaVA (:mod:`tome.adapters.transformers_llava`): the language model
sees an image of ``k`` tokens, as if the vision side had produced that many.

What is installed on the top model, as for LLaVA (module-level functions: a patched model
deep-copies and pickles; ``tome.unpatch`` takes it all away): ``generate`` (an instance method
shadowing the class's; it computes the image features once with the model's own
``get_image_features``, merges them and calls the class's ``generate`` with them as
``mm_encoder_outputs`` instead of ``pixel_values``), a forward pre-hook doing the same for a
direct ``model(...)`` call (``labels`` shortened too), and the proportional-attention pre-hooks
on the language model's attention layers (``visual_prop_attn``).

Merged only when ``input_ids``, ``pixel_values`` and ``image_sizes`` are given (the processor's
inputs); a text-only prompt, ``inputs_embeds`` or pre-computed ``mm_encoder_outputs`` run
unchanged, as does a prompt whose placeholders do not match its images (the model raises its
own error). OneVision videos (``pixel_values_videos``): their features are computed by the
model's own ``get_video_features`` and passed on unmerged, next to the merged images (a prompt
with videos and no images runs unchanged).

Example (a tiny random LLaVA-NeXT: 16 px crops of 4 px patches, 16 tokens each):

>>> import torch, tome
>>> from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
>>> vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                           num_attention_heads=2, image_size=16, patch_size=4)
>>> text = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
>>> config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=99,
...                          image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
>>> model = LlavaNextForConditionalGeneration(config).eval()
>>> sizes = torch.tensor([[32, 32]])  # a 2x2 grid of crops: 16 + 8 rows of (8 + newline) = 88 tokens
>>> ids = torch.tensor([[1, 5] + [99] * 88 + [7]])
>>> inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_sizes": sizes,
...           "pixel_values": torch.randn(1, 5, 3, 16, 16)}  # the base image and 4 crops
>>> model = tome.patch(model, visual_tokens=16)
>>> out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
>>> out.sequences.shape, out.cache.get_seq_length()  # prompt as given; the cache: 2 + 16 + 1 + 2
(torch.Size([1, 94]), 21)
>>> tome.unpatch(model) is model
True
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from tome.adapters.common.anyres import reduce_packed
from tome.adapters.common.vlm import (
    BIAS,
    VisualHandle,
    forward_done,
    forward_reduced,
    generate_reduced,
    install_prop_attn,
    shorten_prompts,
    size_bias,
)
from tome.adapters.common.vlm import VISUAL_DEFAULTS as DEFAULTS
from tome.runtime.registry import REDUCE_ONCE, Adapter

__all__ = ["DEFAULTS", "VisualHandle", "apply"]

# Per-token inputs of forward() that lose the same positions as input_ids.
_PER_TOKEN = ("labels", "position_ids", "token_type_ids")
# Arguments of get_image_features that forward() and generate() take (each class takes those
# its get_image_features names: OneVision adds the last two).
_ENCODER_ARGS = (
    "image_sizes",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "vision_aspect_ratio",
    "batch_num_images",
)
_VIDEO_ARGS = ("vision_feature_layer", "vision_feature_select_strategy")


# -- the rewrite (module-level: patched models pickle and deep-copy) -----------------------------


def _reduced(model: nn.Module, handle: VisualHandle, ids: object, kwargs: dict) -> tuple[dict, int] | None:
    """``kwargs`` (a forward's or generate's keyword arguments, ``input_ids`` given as ``ids``)
    rewritten: merged image features (and OneVision's video features, unmerged) as
    ``mm_encoder_outputs`` instead of pixels, ``input_ids`` and the per-token inputs
    shortened; and the new length. ``None``: run as is."""
    pixels = kwargs.get("pixel_values")
    if (
        not handle.merges()
        or not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or pixels is None
        or kwargs.get("image_sizes") is None
        or kwargs.get("inputs_embeds") is not None
        or kwargs.get("mm_encoder_outputs") is not None
    ):
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        return None  # a 4-D mask, or one that covers a cache: not a prompt of its own
    takes = inspect.signature(model.get_image_features).parameters
    encoder = {name: kwargs[name] for name in _ENCODER_ARGS if name in takes and kwargs.get(name) is not None}
    image = model.get_image_features(pixel_values=pixels, return_dict=True, **encoder)
    features = list(image.pooler_output)
    newline = getattr(model.model, "image_newline", None)
    merged, sources = reduce_packed(features, newline, handle.visual_tokens, handle.visual_ratio)
    before = [f.shape[0] for f in features]
    after = [f.shape[0] for f in merged]
    if before == after:
        return None
    extra = {
        name: kwargs[name]
        for name in _PER_TOKEN
        if isinstance(kwargs.get(name), torch.Tensor) and kwargs[name].shape == ids.shape
    }
    placeholder = model.config.image_token_id
    if handle.visual_prop_attn and int((ids == placeholder).sum()) == sum(before):
        extra[BIAS] = size_bias(ids, placeholder, sources, after)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    shortened = shorten_prompts(
        ids, mask, placeholder, before, after, extra, pad_id=pad if isinstance(pad, int) else 0
    )
    if shortened is None:  # (then no bias was made either)
        return None  # placeholders and images do not match: the model's own error
    image.pooler_output = merged
    encoded = {"image": image}
    videos = kwargs.get("pixel_values_videos")
    if videos is not None:  # OneVision: the model refuses pixels next to mm_encoder_outputs
        video_args = {name: kwargs[name] for name in _VIDEO_ARGS if kwargs.get(name) is not None}
        encoded["video"] = model.get_video_features(
            pixel_values_videos=videos, return_dict=True, **video_args
        )
    rewritten = {
        k: v
        for k, v in kwargs.items()
        if k not in ("pixel_values", "pixel_values_videos", "input_ids", "inputs")
    }
    rewritten.update(shortened.tensors)  # the key bias too, under BIAS: generate_reduced takes it
    rewritten["mm_encoder_outputs"] = encoded
    return rewritten, shortened.width


def _generate(model: nn.Module, handle: VisualHandle, *args, **kwargs):
    return generate_reduced(
        model, args, kwargs, lambda ids, given: _reduced(model, handle, ids, given), handle
    )


def _forward_pre_hook(handle: VisualHandle, model: nn.Module, args: tuple, kwargs: dict):
    return forward_reduced(
        model, args, kwargs, lambda ids, given: _reduced(model, handle, ids, given), handle
    )


# -- patching ---------------------------------------------------------------------------------------


def apply(model: nn.Module, **visual: object) -> VisualHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    if (
        not callable(getattr(model, "get_image_features", None))
        or not isinstance(getattr(model.config, "image_token_id", None), int)
        or not isinstance(getattr(getattr(model, "model", None), "image_newline", None), torch.Tensor)
    ):
        raise TypeError(
            f"tome: expected a LLaVA-NeXT / LLaVA-OneVision model with get_image_features(), "
            f"config.image_token_id and model.image_newline, got a {type(model).__name__}"
        )
    handle = VisualHandle(**visual)  # checks every option before the model changes
    with handle.installing():
        handle.install_method(model, "generate", _generate, handle)
        handle.install_pre_hook(model, _forward_pre_hook, handle)
        handle.install_hook(model, forward_done, handle)
        install_prop_attn(handle, model.model.language_model)
    return handle


ADAPTER = Adapter(
    patches=(
        "transformers.LlavaNextForConditionalGeneration",
        "transformers.LlavaOnevisionForConditionalGeneration",
    ),
    apply=apply,
    kind=REDUCE_ONCE,
    handle=VisualHandle,
    title=(
        "vision-language models with AnyRes crops (transformers LlavaNextForConditionalGeneration, "
        "LlavaOnevisionForConditionalGeneration)"
    ),
    merged=(
        "each image's packed visual tokens (base image and crops; the row newlines kept as one), "
        "once, before the language model: shorter prefill and KV cache; OneVision videos unmerged"
    ),
    tested_on="tiny random configs (CLIP vision + Llama; SigLIP vision + Qwen2)",
    schedule=("visual_tokens", "visual_ratio"),
)
