"""transformers ``Qwen2_5_VLForConditionalGeneration`` and ``Qwen2VLForConditionalGeneration``:
reduce once, before the decoder (images and videos).

Every image reaches the language model as at most ``visual_tokens`` tokens (or with
``visual_ratio`` of its tokens merged away): its visual features (the vision tower's output after
the 2x2 patch merger, what the language model reads) are merged by tome's own core, and the
image's run of ``image_token_id`` placeholders is shortened to match
(:mod:`tome.adapters.common.vlm`), as for LLaVA (:mod:`tome.adapters.transformers_llava`).

Positions (3-D M-RoPE): the positions of the prompt as given are computed first, exactly as the
unpatched model would (``get_rope_index`` when ``mm_token_type_ids`` and ``image_grid_thw`` are
given, as the processor gives them; else the plain 1-D positions the model then uses); every text
token keeps its position, and each merged visual token gets the size-weighted mean, rounded, of
the ``(t, h, w)`` positions of the tokens it holds. The shortened prompt goes to the model with
these ``position_ids``, so the language model sees each image at the place and scale it would
have had (Qwen's positions already span an image by its grid, ``max(h, w)`` steps, not by its
token count), only sparser; decode steps continue from the original prompt's positions
(``generate()`` extends the given ``position_ids`` by one per step; ``model.model.rope_deltas`` is
set for a continuation without them).

Every video (``pixel_values_videos``, ``video_grid_thw``) keeps all but ``video_ratio`` of its
tokens: merged across its temporal groups first (a still region becomes one token whose size
counts the groups it covers; a cut, a group unlike the one before, starts a new segment and no
merge crosses it), then spatially inside each segment (:mod:`tome.adapters.common.video`). Its
merged tokens get positions by the same rule as images: the size-weighted mean of their tokens'
``(t, h, w)``, rounded (a run of still groups sits at the middle of its time span). Images and
videos are set separately: ``tome.patch(vlm, visual_tokens=64, video_ratio=0.9)``.

What is installed on the top model (module-level functions; ``tome.unpatch`` takes it all away):
``generate`` (an instance method shadowing the class's) and a forward pre-hook, as for LLaVA,
and the proportional-attention pre-hooks on the language model's attention layers
(``visual_prop_attn``).

Merged only when ``input_ids`` and ``pixel_values`` with ``image_grid_thw`` (or
``pixel_values_videos`` with ``video_grid_thw``) are given; a text-only prompt, ``inputs_embeds``,
pre-computed ``mm_encoder_outputs`` or a call continuing a cache run unchanged, as does a prompt
whose placeholders do not match its images or videos (the model raises its own error).

Example (a tiny random Qwen2.5-VL):

>>> import torch, tome
>>> from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
>>> vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
...               patch_size=4, window_size=16, fullatt_block_indexes=[1])
>>> text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
...             rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4})
>>> qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
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

import torch
import torch.nn as nn

from tome.adapters.common.video import VideoVisualHandle, kept_video_tokens, merge_video
from tome.adapters.common.vlm import (
    BIAS,
    forward_done,
    forward_reduced,
    generate_reduced,
    install_prop_attn,
    merged_positions,
    reduce_images_tracked,
    shorten_prompts,
    size_bias,
)
from tome.runtime.registry import REDUCE_ONCE, Adapter

__all__ = ["apply"]

# Per-token inputs of forward() / generate() that lose the same positions as input_ids.
_PER_TOKEN = ("labels", "token_type_ids", "mm_token_type_ids")


def _cache_length(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 1


def _original_positions(model: nn.Module, ids: torch.Tensor, kwargs: dict, generating: bool) -> torch.Tensor:
    """``(3, B, L)``: the M-RoPE positions the unpatched model gives the prompt as given."""
    given = kwargs.get("position_ids")
    if isinstance(given, torch.Tensor):
        if given.dim() == 2:
            return given[None].expand(3, -1, -1)
        return given[-3:]  # (4, B, L): the text row first, then (t, h, w)
    mask = kwargs.get("attention_mask")
    types = kwargs.get("mm_token_type_ids")
    if types is not None and (
        kwargs.get("image_grid_thw") is not None or kwargs.get("video_grid_thw") is not None
    ):
        positions, _ = model.model.get_rope_index(
            ids,
            mm_token_type_ids=types,
            image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"),
            second_per_grid_ts=kwargs.get("second_per_grid_ts"),
            attention_mask=mask,
        )
        return positions
    B, L = ids.shape
    if generating and mask is not None:  # generate()'s own 1-D positions
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    else:  # a forward numbers every column, padding included
        positions = torch.arange(L, device=ids.device).expand(B, L)
    return positions[None].expand(3, B, L)


def _video_merges(
    features: list[torch.Tensor], groups: list[int], ratio: float | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each video's features merged by :func:`~tome.adapters.common.video.merge_video` (across
    its frame groups first, then inside each segment), one video at a time (each by its own
    similarities); with each video's source map (the identity for a video left as it was)."""
    merged, sources = [], []
    for video, T in zip(features, groups, strict=True):
        keep = kept_video_tokens(video.shape[0], ratio)
        out = merge_video(video, T, keep)
        merged.append(out.features)
        sources.append(out.source)
    return merged, sources


def _reduced(
    model: nn.Module, handle: VideoVisualHandle, ids: object, kwargs: dict, generating: bool
) -> tuple[dict, int] | None:
    """``kwargs`` rewritten: merged image and video features as ``mm_encoder_outputs`` instead of
    ``pixel_values`` / ``pixel_values_videos``, ``input_ids`` and the per-token inputs shortened,
    ``position_ids`` of the shortened prompt; and its new length. ``None``: run as is."""
    pixels, grid = kwargs.get("pixel_values"), kwargs.get("image_grid_thw")
    frames, video_grid = kwargs.get("pixel_values_videos"), kwargs.get("video_grid_thw")
    images = pixels is not None and grid is not None
    videos = frames is not None and video_grid is not None
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or not ((images and handle.merges_images()) or (videos and handle.merges_videos()))
        or (pixels is not None and grid is None)
        or (frames is not None and video_grid is None)
        or kwargs.get("inputs_embeds") is not None
        or kwargs.get("mm_encoder_outputs") is not None
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
    unit = model.model.visual.spatial_merge_size**2
    # (placeholder id, tokens per item before, features, source maps) per modality present
    kinds: list[tuple[int, list[int], object, list[torch.Tensor]]] = []
    if images:
        before = (grid.prod(-1) // unit).tolist()
        if int((ids == model.config.image_token_id).sum()) != sum(before):
            return None  # placeholders and images do not match: the model's own error
        out = model.get_image_features(pixel_values=pixels, image_grid_thw=grid, return_dict=True)
        features = list(out.pooler_output)
        if handle.merges_images():
            merged, sources = reduce_images_tracked(features, handle.visual_tokens, handle.visual_ratio)
        else:
            merged, sources = features, [torch.arange(f.shape[0], device=f.device) for f in features]
        out.pooler_output = merged
        kinds.append((model.config.image_token_id, before, out, sources))
    if videos:
        placeholder = getattr(model.config, "video_token_id", None)
        before = (video_grid.prod(-1) // unit).tolist()
        if not isinstance(placeholder, int) or int((ids == placeholder).sum()) != sum(before):
            return None  # placeholders and videos do not match: the model's own error
        out = model.get_video_features(
            pixel_values_videos=frames, video_grid_thw=video_grid, return_dict=True
        )
        features = list(out.pooler_output)
        if handle.merges_videos():
            merged, sources = _video_merges(features, video_grid[:, 0].tolist(), handle.video_ratio)
        else:
            merged, sources = features, [torch.arange(f.shape[0], device=f.device) for f in features]
        out.pooler_output = merged
        kinds.append((placeholder, before, out, sources))
    if all(before == [f.shape[0] for f in out.pooler_output] for _, before, out, _ in kinds):
        return None
    original = _original_positions(model, ids, kwargs, generating)
    positions = original
    bias = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    for placeholder, before, out, sources in kinds:
        after = [f.shape[0] for f in out.pooler_output]
        if after == before:
            continue
        positions = merged_positions(positions, ids, placeholder, sources, after)
        if handle.visual_prop_attn:
            bias = bias + size_bias(ids, placeholder, sources, after)
    extra = {
        name: kwargs[name]
        for name in _PER_TOKEN
        if isinstance(kwargs.get(name), torch.Tensor) and kwargs[name].shape == ids.shape
    }
    extra.update({f"_position_{row}": positions[row] for row in range(3)})
    if handle.visual_prop_attn:
        extra[BIAS] = bias
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    pad = pad if isinstance(pad, int) else 0
    # One modality at a time: each shortening keeps the other's placeholders as they are.
    tensors, new_mask, width = {"input_ids": ids, **extra}, mask, ids.shape[1]
    for placeholder, before, out, _ in kinds:
        after = [f.shape[0] for f in out.pooler_output]
        if after == before:
            continue
        rest = {k: v for k, v in tensors.items() if k not in ("input_ids", "attention_mask")}
        shortened = shorten_prompts(
            tensors["input_ids"], new_mask, placeholder, before, after, rest, pad_id=pad
        )
        if shortened is None:
            return None
        tensors = dict(shortened.tensors)
        new_mask, width = tensors.get("attention_mask"), shortened.width
    rope = torch.stack([tensors.pop(f"_position_{row}") for row in range(3)])
    real = torch.ones_like(tensors["input_ids"]) if new_mask is None else new_mask.long()
    text = (real.cumsum(-1) - 1).masked_fill(real == 0, 0)  # what generate() numbers the tokens
    # A continuation without position_ids (the model's rope_deltas) goes on from the original
    # prompt's last position: delta = its max + 1 - the shortened row's real tokens.
    highest = original.masked_fill(~_real(mask, ids)[None], 0).amax(dim=(0, 2))
    model.model.rope_deltas = (highest + 1 - real.sum(-1))[:, None]
    if generating or (isinstance(given, torch.Tensor) and given.dim() == 3 and given.shape[0] == 4):
        # generate(): the text row first (the mask is built from it), as generate() builds them
        tensors["position_ids"] = torch.cat([text[None], rope])
    else:
        tensors["position_ids"] = rope
    drop = ("pixel_values", "pixel_values_videos", "input_ids", "inputs")
    rewritten = {k: v for k, v in kwargs.items() if k not in drop}
    rewritten.update(tensors)
    names = {model.config.image_token_id: "image"}
    rewritten["mm_encoder_outputs"] = {
        names.get(placeholder, "video"): out for placeholder, _, out, _ in kinds
    }
    return rewritten, width


def _real(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()


def _generate(model: nn.Module, handle: VideoVisualHandle, *args, **kwargs):
    return generate_reduced(
        model, args, kwargs, lambda ids, given: _reduced(model, handle, ids, given, generating=True), handle
    )


def _forward_pre_hook(handle: VideoVisualHandle, model: nn.Module, args: tuple, kwargs: dict):
    reduce = lambda ids, given: _reduced(model, handle, ids, given, generating=False)  # noqa: E731
    if args or kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is None:
        return forward_reduced(model, args, kwargs, reduce, handle)
    # Videos without images: forward_reduced looks for pixel_values only, so its part is done
    # here (the same per-call bias handling).
    slot = handle._slot
    top = not slot.generating
    if top:
        slot.bias = None
    reduced = reduce(kwargs.get("input_ids"), kwargs)
    if reduced is None:
        return None
    rewritten = reduced[0]
    bias = rewritten.pop(BIAS, None)
    if top and handle.visual_prop_attn:
        slot.bias = bias
    return (), rewritten


# -- patching ---------------------------------------------------------------------------------------


def apply(model: nn.Module, **visual: object) -> VideoVisualHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    inner = getattr(model, "model", None)
    if (
        not callable(getattr(model, "get_image_features", None))
        or not callable(getattr(inner, "get_rope_index", None))
        or not isinstance(getattr(model.config, "image_token_id", None), int)
    ):
        raise TypeError(
            f"tome: expected a Qwen2-VL / Qwen2.5-VL model with get_image_features(), "
            f"model.get_rope_index() and config.image_token_id, got a {type(model).__name__}"
        )
    handle = VideoVisualHandle(**visual)  # checks every option before the model changes
    with handle.installing():
        handle.install_method(model, "generate", _generate, handle)
        handle.install_pre_hook(model, _forward_pre_hook, handle)
        handle.install_hook(model, forward_done, handle)
        install_prop_attn(handle, model.model.language_model)
    return handle


ADAPTER = Adapter(
    patches=(
        "transformers.Qwen2_5_VLForConditionalGeneration",
        "transformers.Qwen2VLForConditionalGeneration",
    ),
    apply=apply,
    kind=REDUCE_ONCE,
    handle=VideoVisualHandle,
    title="vision-language models (transformers Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration)",
    merged="each image's visual tokens, once, before the language model, M-RoPE positions kept: "
    "shorter prefill and KV cache",
    tested_on="tiny random configs (Qwen2.5-VL, Qwen2-VL)",
    schedule=("visual_tokens", "visual_ratio", "video_ratio"),
)
