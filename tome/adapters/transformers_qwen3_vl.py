"""transformers ``Qwen3VLForConditionalGeneration``: reduce once, before the decoder, DeepStack
included (images; prompts with videos run unmerged).

Qwen3-VL reads images as Qwen2.5-VL does (native resolution, a 2x2 patch merger, 3-D M-RoPE,
its frequencies interleaved over (t, h, w)), plus **DeepStack**: the vision tower also hands out
the features of a few of its intermediate layers (``deepstack_features``, one ``(n_i, D)`` tensor
per image and level, through their own 2x2 mergers), and the language model adds level ``l`` to
its hidden states at the visual positions after its decoder layer ``l`` (``visual_pos_masks``,
``deepstack_visual_embeds``).

Every image reaches the language model as at most ``visual_tokens`` tokens (or with
``visual_ratio`` of its tokens merged away): its main features (the tower's output after the
merger, what the language model reads first) are merged by tome's own core
(:func:`tome.adapters.common.vlm.reduce_images_tracked`: size-weighted means, and each original
token's merged token), and **every DeepStack level is merged with the same groups**: merged token
``j`` of level ``l`` is the mean of level ``l``'s features of exactly the original tokens merged
token ``j`` holds (:func:`merge_like`). So each merged visual position of the language model gets,
in every layer, the mean of what its tokens would have got: main features and injections stay
paired, as in the unmerged model, only coarser. (Merging each level by its own similarities would
pair a position's main feature with the injections of other tokens.)

Positions, as for Qwen2.5-VL (:mod:`tome.adapters.transformers_qwen_vl`): the positions of the
prompt as given are computed first, exactly as the unpatched model would (``get_rope_index``,
from ``mm_token_type_ids`` and ``image_grid_thw``, as the processor gives them); every text token
keeps its position, each merged visual token gets the rounded size-weighted mean of the
``(t, h, w)`` positions of the tokens it holds, and the shortened prompt goes to the model with
these ``position_ids``; decode steps continue from the original prompt's positions
(``generate()`` extends the given positions; ``model.model.rope_deltas`` is set for a
continuation without them).

What is installed on the top model (module-level functions; ``tome.unpatch`` takes it all away):
``generate`` (an instance method shadowing the class's) and a forward pre-hook, as for LLaVA, and
the proportional-attention pre-hooks on the language model's attention layers
(``visual_prop_attn``).

Merged only when ``input_ids``, ``pixel_values`` and ``image_grid_thw`` are given; a text-only
prompt, ``inputs_embeds``, pre-computed ``mm_encoder_outputs``, videos (``pixel_values_videos``:
the whole prompt) or a call continuing a cache run unchanged, as does a prompt whose placeholders
do not match its images, or a direct forward without ``mm_token_type_ids`` (the model raises its
own errors).

Example (a tiny random Qwen3-VL with DeepStack after vision layers 0 and 1):

>>> import torch, tome, transformers
>>> vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
...               patch_size=4, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
>>> text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, head_dim=8,
...             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
...             rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4})
>>> qwen = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(
...     vision_config=vision, text_config=text, image_token_id=99, video_token_id=98)).eval()
>>> grid = torch.tensor([[1, 8, 8]])  # 64 patches -> 16 tokens after the 2x2 merger
>>> ids = torch.tensor([[1, 5] + [99] * 16 + [7]])
>>> inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": grid,
...           "mm_token_type_ids": (ids == 99).int(), "pixel_values": torch.randn(64, 3 * 2 * 4 * 4)}
>>> qwen = tome.patch(qwen, visual_tokens=4)
>>> out = qwen.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
>>> out.sequences.shape, out.cache.get_seq_length()  # prompt as given; the cache: 2 + 4 + 1 + 2
(torch.Size([1, 22]), 9)
>>> tome.unpatch(qwen) is qwen
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from tome.adapters.common.vlm import (
    BIAS,
    VisualHandle,
    forward_done,
    forward_reduced,
    generate_reduced,
    install_prop_attn,
    merged_positions,
    reduce_images_tracked,
    shorten_prompts,
    size_bias,
)
from tome.core import merge as M
from tome.runtime.registry import REDUCE_ONCE, Adapter

__all__ = ["apply", "merge_like"]

# Per-token inputs of forward() / generate() that lose the same positions as input_ids.
_PER_TOKEN = ("labels", "token_type_ids", "mm_token_type_ids")


def merge_like(
    features: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], after: Sequence[int]
) -> list[torch.Tensor]:
    """Each image's features ``(n_i, D)`` merged with the groups another merge made: merged
    token ``j`` is the mean of the rows ``r`` with ``sources[i][r] == j`` (``after[i]`` tokens;
    an image whose ``after[i] == n_i`` comes back as it was). The size-weighted merge that
    :func:`~tome.adapters.common.vlm.reduce_images_tracked` made of the main features, applied to
    another tensor of the same tokens (a DeepStack level).

    >>> merge_like([torch.tensor([[0.0], [2.0], [4.0]])], [torch.tensor([0, 1, 0])], [2])[0].tolist()
    [[2.0], [2.0]]
    """
    out = []
    for feature, source, k in zip(features, sources, after, strict=True):
        if k == feature.shape[0]:
            out.append(feature)
            continue
        source = source.to(feature.device)
        sizes = torch.bincount(source, minlength=k).to(torch.float32)
        history = M.MergeHistory(source[None], sizes[None])
        out.append(M.merge_original(history, feature[None])[0])
    return out


def _cache_length(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 1


def _original_positions(
    model: nn.Module, ids: torch.Tensor, kwargs: dict, generating: bool
) -> torch.Tensor | None:
    """``(3, B, L)``: the M-RoPE positions the unpatched model gives the prompt as given; ``None``
    where the unpatched model raises (a forward with images and no ``mm_token_type_ids``)."""
    given = kwargs.get("position_ids")
    if isinstance(given, torch.Tensor):
        if given.dim() == 2:
            return given[None].expand(3, -1, -1)
        return given[-3:]  # (4, B, L): the text row first, then (t, h, w)
    mask = kwargs.get("attention_mask")
    types = kwargs.get("mm_token_type_ids")
    if types is not None:
        positions, _ = model.model.get_rope_index(
            ids,
            mm_token_type_ids=types,
            image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"),
            attention_mask=mask,
        )
        return positions
    if not generating:
        return None  # the model's own error: "... mm_token_type_ids is missing"
    # generate() without mm_token_type_ids: its 1-D positions on every row of M-RoPE
    B, L = ids.shape
    if mask is not None:
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    else:
        positions = torch.arange(L, device=ids.device).expand(B, L)
    return positions[None].expand(3, B, L)


def _reduced(
    model: nn.Module, handle: VisualHandle, ids: object, kwargs: dict, generating: bool
) -> tuple[dict, int] | None:
    """``kwargs`` rewritten: merged image features (main and DeepStack) as ``mm_encoder_outputs``
    instead of ``pixel_values``, ``input_ids`` and the per-token inputs shortened,
    ``position_ids`` of the shortened prompt; and its new length. ``None``: run as is."""
    pixels = kwargs.get("pixel_values")
    grid = kwargs.get("image_grid_thw")
    if (
        not handle.merges()
        or not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or pixels is None
        or grid is None
        or kwargs.get("inputs_embeds") is not None
        or kwargs.get("mm_encoder_outputs") is not None
        or kwargs.get("pixel_values_videos") is not None
        or _cache_length(kwargs) > 0
    ):
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        return None  # a 4-D mask, or one that covers a cache: not a prompt of its own
    given = kwargs.get("position_ids")
    if given is not None and (
        not isinstance(given, torch.Tensor)
        or given.shape[-2:] != ids.shape
        or not (given.dim() == 2 or (given.dim() == 3 and given.shape[0] in (3, 4)))
    ):
        return None
    placeholder = model.config.image_token_id
    before = (grid.prod(-1) // model.model.visual.spatial_merge_size**2).tolist()
    if int((ids == placeholder).sum()) != sum(before):
        return None  # placeholders and images do not match: the model's own error
    original = _original_positions(model, ids, kwargs, generating)
    if original is None:
        return None
    image = model.get_image_features(pixel_values=pixels, image_grid_thw=grid, return_dict=True)
    features = list(image.pooler_output)
    merged, sources = reduce_images_tracked(features, handle.visual_tokens, handle.visual_ratio)
    after = [f.shape[0] for f in merged]
    if before == after:
        return None
    positions = merged_positions(original, ids, placeholder, sources, after)
    extra = {
        name: kwargs[name]
        for name in _PER_TOKEN
        if isinstance(kwargs.get(name), torch.Tensor) and kwargs[name].shape == ids.shape
    }
    extra.update({f"_position_{row}": positions[row] for row in range(3)})
    if handle.visual_prop_attn:
        extra[BIAS] = size_bias(ids, placeholder, sources, after)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    shortened = shorten_prompts(
        ids, mask, placeholder, before, after, extra, pad_id=pad if isinstance(pad, int) else 0
    )
    if shortened is None:
        return None
    tensors = dict(shortened.tensors)
    rope = torch.stack([tensors.pop(f"_position_{row}") for row in range(3)])
    new_mask = tensors.get("attention_mask")
    real = torch.ones_like(tensors["input_ids"]) if new_mask is None else new_mask.long()
    text = (real.cumsum(-1) - 1).masked_fill(real == 0, 0)  # what generate() numbers the tokens
    # A continuation without position_ids (the model's rope_deltas) goes on from the original
    # prompt's last position: delta = its max + 1 - the shortened row's real tokens.
    old_real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    highest = original.masked_fill(~old_real[None], 0).amax(dim=(0, 2))
    model.model.rope_deltas = (highest + 1 - real.sum(-1))[:, None]
    if generating or (isinstance(given, torch.Tensor) and given.dim() == 3 and given.shape[0] == 4):
        # generate(): the text row first (the causal mask is built from it), as generate() builds them
        tensors["position_ids"] = torch.cat([text[None], rope])
    else:
        tensors["position_ids"] = rope
    image.pooler_output = tuple(merged)
    # every DeepStack level with the main features' groups (the model concatenates each level's images)
    image.deepstack_features = [
        tuple(merge_like(level, sources, after)) for level in (image.deepstack_features or [])
    ]
    rewritten = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "input_ids", "inputs")}
    rewritten.update(tensors)
    rewritten["mm_encoder_outputs"] = {"image": image}
    return rewritten, shortened.width


def _generate(model: nn.Module, handle: VisualHandle, *args, **kwargs):
    return generate_reduced(
        model, args, kwargs, lambda ids, given: _reduced(model, handle, ids, given, generating=True), handle
    )


def _forward_pre_hook(handle: VisualHandle, model: nn.Module, args: tuple, kwargs: dict):
    return forward_reduced(
        model, args, kwargs, lambda ids, given: _reduced(model, handle, ids, given, generating=False), handle
    )


# -- patching ---------------------------------------------------------------------------------------


def apply(model: nn.Module, **visual: object) -> VisualHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    inner = getattr(model, "model", None)
    if (
        not callable(getattr(model, "get_image_features", None))
        or not callable(getattr(inner, "get_rope_index", None))
        or not isinstance(getattr(model.config, "image_token_id", None), int)
    ):
        raise TypeError(
            f"tome: expected a Qwen3-VL model with get_image_features(), model.get_rope_index() and "
            f"config.image_token_id, got a {type(model).__name__}"
        )
    handle = VisualHandle(**visual)  # checks every option before the model changes
    with handle.installing():
        handle.install_method(model, "generate", _generate, handle)
        handle.install_pre_hook(model, _forward_pre_hook, handle)
        handle.install_hook(model, forward_done, handle)
        install_prop_attn(handle, model.model.language_model)
    return handle


ADAPTER = Adapter(
    patches=("transformers.Qwen3VLForConditionalGeneration",),
    apply=apply,
    kind=REDUCE_ONCE,
    handle=VisualHandle,
    title="vision-language models (transformers Qwen3VLForConditionalGeneration)",
    merged="each image's visual tokens and its DeepStack features with the same groups, once, before "
    "the language model, M-RoPE positions kept: shorter prefill and KV cache",
    tested_on="tiny random configs (Qwen3-VL with DeepStack)",
    schedule=("visual_tokens", "visual_ratio"),
)
