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
>>> _ = torch.manual_seed(0)  # random weights: a fixed draw, so that no end token cuts the answer short
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

from tome.adapters.common.mrope import Runs, original_positions, plain_prompt, rewrite_prompt
from tome.adapters.common.video import VideoVisualHandle, forward_reduced_videos, merge_videos
from tome.adapters.common.vlm import (
    reduce_images_tracked,
)
from tome.adapters.common.vlm_call import install_visual, require
from tome.runtime.registry import REDUCE_ONCE, Adapter

__all__ = ["apply"]


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
        not ((images and handle.merges_images()) or (videos and handle.merges_videos()))
        or (pixels is not None and grid is None)
        or (frames is not None and video_grid is None)
        or not plain_prompt(ids, kwargs)
    ):
        return None
    unit = model.model.visual.spatial_merge_size**2
    merged: list[tuple[Runs, str, object]] = []  # per modality present: its runs, key, encoder output
    if images:
        before = (grid.prod(-1) // unit).tolist()
        placeholder = model.config.image_token_id
        if int((ids == placeholder).sum()) != sum(before):
            return None  # placeholders and images do not match: the model's own error
        out = model.get_image_features(pixel_values=pixels, image_grid_thw=grid, return_dict=True)
        features = list(out.pooler_output)
        if handle.merges_images():
            features, sources = reduce_images_tracked(features, handle.visual_tokens, handle.visual_ratio)
        else:
            sources = [torch.arange(f.shape[0], device=f.device) for f in features]
        out.pooler_output = features
        merged.append((Runs.from_items(placeholder, sources, [f.shape[0] for f in features]), "image", out))
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
            done = merge_videos(features, video_grid[:, 0].tolist(), handle.video_ratio)
            features, sources = [v.features for v in done], [v.source for v in done]
        else:
            sources = [torch.arange(f.shape[0], device=f.device) for f in features]
        out.pooler_output = features
        # one run of placeholders per video (Qwen2 / 2.5 write a video's groups in one run)
        merged.append((Runs.from_items(placeholder, sources, [f.shape[0] for f in features]), "video", out))
    if not any(runs.merges() for runs, _, _ in merged):
        return None
    original = original_positions(model, ids, kwargs, generating, forward_without_types="arange")
    return rewrite_prompt(model, ids, kwargs, merged, original, generating, handle.visual_prop_attn)


# -- patching ---------------------------------------------------------------------------------------


def apply(model: nn.Module, **visual: object) -> VideoVisualHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    require(model, "a Qwen2-VL / Qwen2.5-VL", methods=("get_image_features",), ints=("image_token_id",))
    if not callable(getattr(getattr(model, "model", None), "get_rope_index", None)):
        raise TypeError(
            f"tome: expected a Qwen2-VL / Qwen2.5-VL model with model.get_rope_index(), got a {type(model).__name__}"
        )
    handle = VideoVisualHandle(**visual)  # checks every option before the model changes
    return install_visual(
        handle,
        model,
        _reduced,
        model.model.language_model,
        runner=forward_reduced_videos,
        tell_generating=True,
    )


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
