"""transformers ``Qwen3VLForConditionalGeneration``: reduce once, before the decoder, DeepStack
included (images and videos).

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

Videos (``pixel_values_videos``, ``video_grid_thw``): every video keeps all but ``video_ratio`` of
its tokens, merged across its temporal groups first, then inside each frame group
(:func:`tome.adapters.common.video.merge_video`, as for Qwen2.5-VL), its DeepStack levels with the
same groups. Qwen3-VL's processor writes a timestamp (text) before each temporal group, so each
group has its own run of ``video_token_id`` placeholders and ``get_rope_index`` numbers each group
as an image of its own, starting at the text position where it stands. The merged tokens come in
the order of the groups where they start (a still region's run: in the group where it appeared),
so each group's run is cut to the merged tokens that start in it
(:func:`~tome.adapters.common.video.group_counts`; a group whose regions all continue earlier runs
keeps no placeholder, its timestamp stays). Positions by the rule below: a run over groups 2-5
gets the mean of their times (between the timestamps it spans).

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

Merged only when ``input_ids`` and ``pixel_values`` with ``image_grid_thw`` (or
``pixel_values_videos`` with ``video_grid_thw``) are given; a text-only prompt, ``inputs_embeds``,
pre-computed ``mm_encoder_outputs`` or a call continuing a cache run unchanged, as does a prompt whose placeholders
do not match its images, or a direct forward without ``mm_token_type_ids`` (the model raises its
own errors).

Example (a tiny random Qwen3-VL with DeepStack after vision layers 0 and 1):

>>> import torch, tome, transformers
>>> _ = torch.manual_seed(0)  # random weights: a fixed draw, so that no end token cuts the answer short
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

from tome.adapters.common.mrope import Runs, original_positions, plain_prompt, rewrite_prompt
from tome.adapters.common.video import (
    VideoVisualHandle,
    forward_reduced_videos,
    group_counts,
    merge_videos,
)
from tome.adapters.common.vlm import (
    reduce_images_tracked,
)
from tome.adapters.common.vlm_call import install_visual, require
from tome.core import merge as M
from tome.runtime.registry import REDUCE_ONCE, Adapter

__all__ = ["apply", "merge_like"]


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


def _reduced(
    model: nn.Module, handle: VideoVisualHandle, ids: object, kwargs: dict, generating: bool
) -> tuple[dict, int] | None:
    """``kwargs`` rewritten: merged image and video features (main and DeepStack) as
    ``mm_encoder_outputs`` instead of ``pixel_values`` / ``pixel_values_videos``, ``input_ids``
    and the per-token inputs shortened, ``position_ids`` of the shortened prompt; and its new
    length. ``None``: run as is."""
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
    if images:
        before = (grid.prod(-1) // unit).tolist()
        if int((ids == model.config.image_token_id).sum()) != sum(before):
            return None  # placeholders and images do not match: the model's own error
    if videos:
        placeholder = getattr(model.config, "video_token_id", None)
        before = (video_grid.prod(-1) // unit).tolist()
        if not isinstance(placeholder, int) or int((ids == placeholder).sum()) != sum(before):
            return None  # placeholders and videos do not match: the model's own error
    original = original_positions(model, ids, kwargs, generating, forward_without_types="refuse")
    if original is None:
        return None  # the model's own error: "... mm_token_type_ids is missing"
    merged: list[tuple[Runs, str, object]] = []  # per modality present: its runs, key, encoder output
    if images:
        out = model.get_image_features(pixel_values=pixels, image_grid_thw=grid, return_dict=True)
        features = list(out.pooler_output)
        if handle.merges_images():
            features, sources = reduce_images_tracked(features, handle.visual_tokens, handle.visual_ratio)
        else:
            sources = [torch.arange(f.shape[0], device=f.device) for f in features]
        _set_merged(out, features, sources)
        runs = Runs.from_items(model.config.image_token_id, sources, [f.shape[0] for f in features])
        merged.append((runs, "image", out))
    if videos:
        out = model.get_video_features(
            pixel_values_videos=frames, video_grid_thw=video_grid, return_dict=True
        )
        features = list(out.pooler_output)
        groups = video_grid[:, 0].tolist()
        if handle.merges_videos():
            done = merge_videos(features, groups, handle.video_ratio)
            features, sources = [v.features for v in done], [v.source for v in done]
        else:
            sources = [torch.arange(f.shape[0], device=f.device) for f in features]
        _set_merged(out, features, sources)
        merged.append((_frame_group_runs(placeholder, sources, features, groups), "video", out))
    return rewrite_prompt(model, ids, kwargs, merged, original, generating, handle.visual_prop_attn)


def _set_merged(out: object, features: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """The encoder output ``out`` holding the merged main features, and every DeepStack level
    merged with the main features' groups (the model concatenates each level's items)."""
    after = [f.shape[0] for f in features]
    out.pooler_output = tuple(features)
    out.deepstack_features = [
        tuple(merge_like(level, sources, after)) for level in (out.deepstack_features or [])
    ]


def _frame_group_runs(
    placeholder: int, sources: list[torch.Tensor], features: list[torch.Tensor], groups: list[int]
) -> Runs:
    """The runs of a Qwen3-VL prompt's video placeholders: one per frame group (the processor
    writes a timestamp between the groups, ``get_rope_index`` numbers each group as an image of
    its own); a video's merged tokens go, in order, into the group where each starts
    (:func:`~tome.adapters.common.video.group_counts`); a temporal run spans later groups."""
    before: list[int] = []
    after: list[int] = []
    for source, T in zip(sources, groups, strict=True):
        before += [source.shape[0] // T] * T
        after += group_counts(source, T)
    whole = Runs.from_items(placeholder, sources, [f.shape[0] for f in features])
    return Runs(placeholder, before, after, whole.index, whole.sizes)


# -- patching ---------------------------------------------------------------------------------------


def apply(model: nn.Module, **visual: object) -> VideoVisualHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    require(model, "a Qwen3-VL", methods=("get_image_features",), ints=("image_token_id",))
    if not callable(getattr(getattr(model, "model", None), "get_rope_index", None)):
        raise TypeError(
            f"tome: expected a Qwen3-VL model with model.get_rope_index(), got a {type(model).__name__}"
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
    patches=("transformers.Qwen3VLForConditionalGeneration",),
    apply=apply,
    kind=REDUCE_ONCE,
    handle=VideoVisualHandle,
    title="vision-language models (transformers Qwen3VLForConditionalGeneration)",
    merged="each image's visual tokens and each video's (across frames, then inside each frame group) "
    "with their DeepStack features in the same groups, once, before the language model, M-RoPE "
    "positions kept: shorter prefill and KV cache",
    tested_on="tiny random configs (Qwen3-VL with DeepStack, videos with timestamps)",
    schedule=("visual_tokens", "visual_ratio", "video_ratio"),
)
