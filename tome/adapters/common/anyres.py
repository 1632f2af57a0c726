"""AnyRes images (LLaVA-NeXT, LLaVA-OneVision, LLaVA-NeXT-Video): merge an image's packed features, newlines apart
(and these models' videos: :func:`reduce_packed_videos`; the rewrite of a call: :func:`rewrite_anyres`).

An AnyRes model cuts an image into crops of the vision tower's size and packs each image's
projected features into one sequence: the base (whole, low-resolution) image's tokens, then the
crops' tokens stitched into one grid, unpadded, with the model's learned ``image_newline``
vector after every row of it. So an image of ``n`` tokens is ``V`` visual tokens and ``R``
newline tokens, all ``R`` of them the same vector.

:func:`reduce_packed` merges such an image to :func:`~tome.adapters.common.vlm.kept_tokens`
``(n)`` tokens: its ``V`` visual tokens (base and crops, one set: the base view repeats what
the crops show, at a coarser scale, which is redundancy a merge should find) go through tome's
core down to ``k - 1``; the ``R`` newlines, which mark rows that no longer exist after merging,
become one newline token, last, of size ``R`` (they are identical: their mean is the newline
itself, so this is an exact merge, and with proportional attention it draws the attention the
``R`` newlines together drew). The newline is never averaged with a visual token: it is not a
picture of anything, and the model saw it, in training, only as the end of a row.

An image keeps all its tokens (bit for bit) when ``k >= n``; else it gets ``min(V, k - 1) + 1``
tokens (``k`` in practice, where ``V >= k - 1``; at least 2: a visual token and the newline).

>>> import torch
>>> newline = torch.full((4,), 9.0)
>>> rows = [torch.cat([torch.randn(3, 4), newline[None]]) for _ in range(2)]  # 2 rows of 3 + newline
>>> image = torch.cat([torch.randn(4, 4), *rows])  # base (4 tokens), then the crops: n = 12
>>> merged, sources = reduce_packed([image], newline, visual_tokens=5, visual_ratio=None)
>>> merged[0].shape, torch.equal(merged[0][-1], newline)  # 4 visual tokens, then the newline
(torch.Size([5, 4]), True)
>>> torch.bincount(sources[0]).tolist()[-1]  # the newline holds the 2 newlines
2
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn as nn

from tome.adapters.common.video import kept_video_tokens, merge_video
from tome.adapters.common.vlm import BIAS, kept_tokens, reduce_features, shorten_prompts, size_bias

__all__ = ["newline_mask", "reduce_packed", "reduce_packed_videos", "rewrite_anyres"]

# Per-token inputs of forward() that lose the same positions as input_ids (1-D RoPE: the
# position_ids given, if any, lose them too).
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


def newline_mask(features: torch.Tensor, newline: torch.Tensor | None) -> torch.Tensor:
    """``(n,)`` bool: which of an image's packed features ``(n, D)`` are the ``newline`` vector.

    The model writes the parameter itself (cast to the features' dtype) after each row, so an
    exact comparison finds them; a projected visual token equal to it in every one of ``D``
    coordinates does not happen. ``None`` (no newline): all ``False``.

    >>> newline_mask(torch.tensor([[1.0, 2.0], [0.5, 0.5], [1.0, 2.0]]), torch.tensor([1.0, 2.0])).tolist()
    [True, False, True]
    """
    if newline is None:
        return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    return (features == newline.to(features.device, features.dtype)).all(-1)


def reduce_packed(
    features: Sequence[torch.Tensor],
    newline: torch.Tensor | None,
    visual_tokens: int | None,
    visual_ratio: float | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each image's packed features ``(n_i, D)`` merged (see the module docstring), and each
    image's source map: ``(n_i,)`` int64, the merged token that holds each original token (the
    newlines: the last one; the identity for an image left as it was), as
    :func:`~tome.adapters.common.vlm.reduce_images_tracked` gives it, for
    :func:`~tome.adapters.common.vlm.size_bias`.

    Images with the same numbers of visual tokens and of tokens to keep are merged as one batch
    (one loop step per distinct pair, never per token); each image's result depends on that
    image alone, so a batch's rows stay independent whatever the other images' sizes.
    """
    out: list[torch.Tensor] = list(features)
    sources = [torch.arange(image.shape[0], device=image.device) for image in features]
    plans: dict[tuple[int, int], list[tuple[int, torch.Tensor, int]]] = {}
    for index, image in enumerate(features):
        n = image.shape[0]
        k = kept_tokens(n, visual_tokens, visual_ratio)
        if k >= n:
            continue  # nothing merges: the image as it was, newlines and all
        is_newline = newline_mask(image, newline)
        rows = int(is_newline.sum())  # one host sync per image, not per token
        visual = n - rows
        if visual == 0:
            continue  # not an image the model packs: left alone
        keep = max(1, min(visual, k - 1 if rows else k))
        plans.setdefault((visual, keep), []).append((index, is_newline, rows))
    for (visual, keep), members in plans.items():
        stacked = torch.stack([features[i][~mask] for i, mask, _ in members])
        if keep < visual:
            merged, history = reduce_features(stacked, keep)
            held = history.source
        else:  # only the newlines merge
            merged = stacked
            held = torch.arange(visual, device=stacked.device).expand(len(members), visual)
        for row, (index, mask, rows) in enumerate(members):
            image = features[index]
            # the newlines (if any) all go to the one newline token, after the visual ones
            source = torch.full((image.shape[0],), keep, dtype=torch.long, device=image.device)
            source[~mask] = held[row].to(torch.long)
            out[index] = torch.cat([merged[row], image[mask][-1:]]) if rows else merged[row]
            sources[index] = source
    return out, sources


def reduce_packed_videos(
    features: Sequence[torch.Tensor], frames: int, newline: torch.Tensor | None, video_ratio: float | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each video's features ``(frames * S (+ 1), D)`` (LLaVA-NeXT-Video: the frames' pooled
    tokens; LLaVA-OneVision: the same, then one ``newline``) merged by
    :func:`~tome.adapters.common.video.merge_video` (across frames first, cuts never crossed,
    then inside each frame) to :func:`~tome.adapters.common.video.kept_video_tokens` of its
    frame tokens; a trailing newline stays, last, as it was (it marks the video's end, not a
    picture). Each video's source map too (the newline: the last merged token). One video at
    a time: each by its own similarities.

    >>> newline = torch.full((4,), 9.0)
    >>> still = torch.randn(1, 6, 4).expand(3, 6, 4).reshape(18, 4)  # 3 frames of one still shot
    >>> merged, sources = reduce_packed_videos([torch.cat([still, newline[None]])], 3, newline, 0.5)
    >>> merged[0].shape[0], torch.equal(merged[0][-1], newline), sources[0].tolist()[-1]
    (10, True, 9)
    """
    out, sources = [], []
    for video in features:
        trailing = int(bool(newline_mask(video[-1:], newline)[0])) if video.shape[0] else 0
        visual = video[: video.shape[0] - trailing]
        if frames < 1 or visual.shape[0] % frames:
            raise ValueError(
                f"reduce_packed_videos: a video of {visual.shape[0]} frame tokens does not split into "
                f"{frames} frames"
            )
        done = merge_video(visual, frames, kept_video_tokens(visual.shape[0], video_ratio))
        k = done.features.shape[0]
        tail = torch.full((trailing,), k, dtype=torch.long, device=video.device)
        out.append(torch.cat([done.features, video[visual.shape[0] :]]))
        sources.append(torch.cat([done.source.to(torch.long), tail]))
    return out, sources


def rewrite_anyres(model: nn.Module, handle: object, ids: object, kwargs: dict) -> tuple[dict, int] | None:
    """A LLaVA-NeXT / OneVision / NeXT-Video call's keyword arguments (``input_ids`` given as
    ``ids``) rewritten: each image's packed features merged by :func:`reduce_packed`
    (``handle.visual_tokens`` / ``visual_ratio``), each video's by :func:`reduce_packed_videos`
    (``handle.video_ratio``, where the handle has it), as ``mm_encoder_outputs`` instead of the
    pixels; ``input_ids`` and the per-token inputs shortened (one modality at a time), the key
    bias of proportional attention under :data:`~tome.adapters.common.vlm.BIAS`; and the new
    width. ``None``: run as is (nothing merges, or the placeholders do not match: the model's
    own error)."""
    pixels, videos = kwargs.get("pixel_values"), kwargs.get("pixel_values_videos")
    images = pixels is not None and kwargs.get("image_sizes") is not None
    merge_images = images and (
        handle.merges_images() if hasattr(handle, "merges_images") else handle.merges()
    )
    video_ratio = getattr(handle, "video_ratio", None)
    video_id = getattr(model.config, "video_token_id", None)
    merge_videos = (
        bool(video_ratio)
        and isinstance(videos, torch.Tensor)
        and videos.dim() == 5
        and isinstance(video_id, int)
    )
    if (
        not (merge_images or merge_videos)
        or (pixels is not None and not images)
        or not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or kwargs.get("inputs_embeds") is not None
        or kwargs.get("mm_encoder_outputs") is not None
    ):
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        return None  # a 4-D mask, or one that covers a cache: not a prompt of its own
    newline = getattr(model.model, "image_newline", None)
    # per modality: placeholder, tokens per item before and after, source maps, the encoder output
    merged: list[tuple[int, list[int], list[int], list[torch.Tensor], str, object]] = []
    if images:
        takes = inspect.signature(model.get_image_features).parameters
        encoder = {n: kwargs[n] for n in _ENCODER_ARGS if n in takes and kwargs.get(n) is not None}
        image = model.get_image_features(pixel_values=pixels, return_dict=True, **encoder)
        features = list(image.pooler_output)
        if merge_images:
            out, sources = reduce_packed(features, newline, handle.visual_tokens, handle.visual_ratio)
        else:
            out, sources = features, [torch.arange(f.shape[0], device=f.device) for f in features]
        image.pooler_output = out
        placeholder = model.config.image_token_id
        merged.append(
            (placeholder, [f.shape[0] for f in features], [f.shape[0] for f in out], sources, "image", image)
        )
    if videos is not None:  # the model refuses pixels next to mm_encoder_outputs: encoded here too
        args = {n: kwargs[n] for n in _VIDEO_ARGS if kwargs.get(n) is not None}
        video = model.get_video_features(pixel_values_videos=videos, return_dict=True, **args)
        features = list(video.pooler_output)
        if merge_videos:
            out, sources = reduce_packed_videos(features, videos.shape[1], newline, video_ratio)
            # one (1, total, D) tensor: both models flatten the videos' features (dims 0, 1)
            video.pooler_output = torch.cat(out)[None]
        else:
            out, sources = features, [torch.arange(f.shape[0], device=f.device) for f in features]
        merged.append(
            (video_id, [f.shape[0] for f in features], [f.shape[0] for f in out], sources, "video", video)
        )
    if all(before == after for _, before, after, _, _, _ in merged):
        return None
    for placeholder, before, _, _, _, _ in merged:
        if int((ids == placeholder).sum()) != sum(before):
            return None  # placeholders and features do not match: the model's own error
    extra = {
        name: kwargs[name]
        for name in _PER_TOKEN
        if isinstance(kwargs.get(name), torch.Tensor) and kwargs[name].shape == ids.shape
    }
    if handle.visual_prop_attn:
        extra[BIAS] = sum(
            size_bias(ids, placeholder, sources, after)
            for placeholder, before, after, sources, _, _ in merged
            if before != after
        )
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    pad = pad if isinstance(pad, int) else 0
    tensors, new_mask, width = {"input_ids": ids, **extra}, mask, ids.shape[1]
    for placeholder, before, after, _, _, _ in merged:  # one modality at a time
        if before == after:
            continue
        rest = {k: v for k, v in tensors.items() if k not in ("input_ids", "attention_mask")}
        shortened = shorten_prompts(
            tensors["input_ids"], new_mask, placeholder, before, after, rest, pad_id=pad
        )
        if shortened is None:
            return None
        tensors = dict(shortened.tensors)
        new_mask, width = tensors.get("attention_mask"), shortened.width
    skip = ("pixel_values", "pixel_values_videos", "input_ids", "inputs")
    rewritten = {k: v for k, v in kwargs.items() if k not in skip}
    rewritten.update(tensors)  # the key bias too, under BIAS: generate_reduced takes it
    rewritten["mm_encoder_outputs"] = {name: out for _, _, _, _, name, out in merged}
    return rewritten, width
