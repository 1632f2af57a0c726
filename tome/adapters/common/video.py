"""Videos: merge each video's visual tokens across frames first, then inside each scene.

A video language model reads a clip as ``T`` frame groups (Qwen: temporal patch groups of two
frames) of ``S`` visual tokens each, in raster order ``(t, h, w)``. Most of them repeat what the
group before already showed. :func:`merge_video` reduces one video's tokens ``(T * S, D)`` to
``keep`` tokens in three steps, pure functions on tensors (no ``nn.Module``), so that any family
whose features come as ``(T, S, D)`` (Qwen2-VL / Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video)
can use them:

1. **Cuts** (:func:`find_cuts`): the similarity of each group to the one before is the mean,
   over the ``S`` places, of the cosine of the two tokens at the same place. A group whose
   similarity is below :data:`CUT_SIMILARITY` starts a new *segment* (a scene); nothing ever
   merges across a segment boundary.
2. **Temporal** (:func:`temporal_runs`): at every place, consecutive groups of one segment whose
   tokens are similar to the first token of their run (cosine >= :data:`LINK_SIMILARITY`) form a
   *run*, one token holding them all (size: the number of tokens, i.e. frame groups, it holds).
   If that alone would remove more than the budget, only the most similar links are kept.
3. **Spatial**: inside each segment, and there inside each frame group (a run counts in the
   group it starts in), tome's own bipartite soft matching on the run tokens (size-weighted,
   repeated: one step removes at most half), until ``keep`` tokens remain (a video keeps at
   least one token per frame group in which a run starts). Inside one group, not across the
   whole segment: on the fidelity proxy, spatial merges across frames (a token of frame 2 with
   a similar one of frame 5) cost the per-frame read-outs more (``spatial_within="segment"``
   gives that variant).

Every merged token is the size-weighted mean of the original tokens it holds (exact). The
similarities are cosines of the *centred* features (the video's mean token subtracted): a
language model's visual features share a large common component, which makes every raw cosine
high; centred, unrelated tokens have cosine near 0 and the two thresholds mean the same for any
model. A video's result depends on that video alone.

>>> g = torch.Generator().manual_seed(0)
>>> scene = torch.randn(1, 4, 8, generator=g).expand(3, 4, 8)  # a still shot: 3 groups x 4 tokens
>>> other = torch.randn(1, 4, 8, generator=g).expand(2, 4, 8)  # then a cut to another shot
>>> video = torch.cat([scene, other]).reshape(20, 8)
>>> out = merge_video(video, groups=5, keep=6)
>>> out.segments.tolist(), out.features.shape[0], out.sizes.sum().item()
([0, 0, 0, 1, 1], 6, 20.0)
>>> crossing = [set(out.segment_of_token[out.source == j].tolist()) for j in range(6)]
>>> all(len(s) == 1 for s in crossing)  # no merged token holds both sides of the cut
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tome.adapters.common.vlm import BIAS, Reduce, VisualHandle, forward_reduced
from tome.core import merge as M
from tome.runtime.options import Option

__all__ = [
    "CUT_SIMILARITY",
    "LINK_SIMILARITY",
    "VIDEO_RATIO_DEFAULT",
    "MergedVideo",
    "VideoVisualHandle",
    "centred_units",
    "find_cuts",
    "forward_reduced_videos",
    "frame_similarity",
    "group_counts",
    "kept_video_tokens",
    "merge_video",
    "merge_videos",
    "temporal_runs",
]

# A group whose tokens match the group before (centred cosine, same place, mean over places)
# less than this starts a new segment. benchmarks/video_fidelity.py: a cut between two photos
# scores about 0.0-0.1, a still shot about 1, pans and zooms mostly 0.4-0.9 (DINOv2-S, 224 px).
CUT_SIMILARITY = 0.25
# Tokens at one place join a run while their centred cosine to the run's first token is at
# least this: what the frames show there has not changed.
# benchmarks/video_fidelity.py (photos 0-1, 8-frame pans, zooms, stills): 0.7, 0.85, 0.9, 0.95
# linked tokens that had moved and lost per-frame read-outs (pan, video_ratio 0.5: err/signal
# 0.30 / 0.25 / 0.19 / 0.06); at 0.98 pans and zooms come within 0.01-0.03 of per-frame merging.
LINK_SIMILARITY = 0.98
# The default video_ratio (see docs/video.md): the images' default, the conservative end of
# the published training-free video reductions (which remove ~90% and more).
VIDEO_RATIO_DEFAULT = 0.75


def kept_video_tokens(num_tokens: int, video_ratio: float | None) -> int:
    """Tokens a video of ``num_tokens`` keeps: all but ``floor(video_ratio * num_tokens)``, never
    fewer than 1; all of them for ``None``.

    >>> kept_video_tokens(4096, 0.9), kept_video_tokens(10, None), kept_video_tokens(3, 0.99)
    (410, 10, 1)
    """
    if video_ratio is None:
        return num_tokens
    return max(1, num_tokens - int(num_tokens * video_ratio + 1e-9))


def centred_units(frames: torch.Tensor) -> torch.Tensor:
    """``(T, S, D)`` -> unit vectors of the features minus the video's mean token, float32.

    >>> centred_units(torch.ones(2, 3, 4) + torch.eye(3, 4)).norm(dim=-1).round().tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    x = frames.float()
    x = x - x.mean(dim=(0, 1), keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def frame_similarity(units: torch.Tensor) -> torch.Tensor:
    """``(T,)``: for each group, the mean over places of the cosine of its token and the token
    at the same place in the group before (``units`` from :func:`centred_units`); group 0: 1.

    >>> frame_similarity(centred_units(torch.randn(3, 4, 8)))[0].item()
    1.0
    """
    same = (units[1:] * units[:-1]).sum(-1).mean(-1)
    return torch.cat([same.new_ones(1), same])


def find_cuts(units: torch.Tensor, threshold: float = CUT_SIMILARITY) -> torch.Tensor:
    """``(T,)`` int64: the segment of every group; a group less similar than ``threshold`` to the
    one before (:func:`frame_similarity`) starts a new one.

    >>> a, b = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    >>> find_cuts(centred_units(torch.cat([a, a, b, b]))).tolist()
    [0, 0, 1, 1]
    """
    starts = frame_similarity(units) < threshold
    starts[0] = False
    return starts.long().cumsum(0)


def temporal_runs(
    units: torch.Tensor, segments: torch.Tensor, max_links: int, threshold: float = LINK_SIMILARITY
) -> torch.Tensor:
    """``(T, S)`` bool: which tokens join the run of the token at the same place one group
    earlier (a *link*). A token links when it is in the same segment and its cosine to its run's
    first token is at least ``threshold``; of the links, at most ``max_links`` (the most similar)
    are kept. Every link removes one token.

    >>> x = torch.randn(1, 5, 8).expand(4, 5, 8)  # a still shot: every token links
    >>> temporal_runs(centred_units(x), torch.zeros(4, dtype=torch.long), 100).sum().item()
    15
    >>> temporal_runs(centred_units(x), torch.zeros(4, dtype=torch.long), 7).sum().item()
    7
    """
    T, S = units.shape[:2]
    score = torch.full((T, S), float("-inf"), device=units.device)
    anchor = units[0]
    # One step per group, vectorised over places: runs compare with their first token (no drift).
    for t in range(1, T):
        sim = (units[t] * anchor).sum(-1)
        link = (sim >= threshold) & (segments[t] == segments[t - 1])
        score[t] = torch.where(link, sim, score[t])
        anchor = torch.where(link[:, None], anchor, units[t])
    links = torch.isfinite(score)
    if max_links <= 0:
        return torch.zeros_like(links)
    count = int(links.sum())
    if count > max_links:  # keep the strongest links only (stable: ties in token order)
        order = torch.sort(score.reshape(-1), descending=True, stable=True).indices
        keep = torch.zeros(T * S, dtype=torch.bool, device=units.device)
        keep[order[:max_links]] = True
        links = links & keep.reshape(T, S)
    return links


@dataclass(frozen=True)
class MergedVideo:
    """One video's tokens after :func:`merge_video`.

    Attributes:
        features: ``(k, D)`` the merged tokens (size-weighted means), in the order of the
            original tokens they hold (a run at its first group, a spatial merge at the token
            it merged into).
        source: ``(N,)`` int64: the merged token holding each original token.
        sizes: ``(k,)`` float32: how many original tokens each merged token holds.
        segments: ``(T,)`` int64: the segment (scene) of every frame group.
        segment_of_token: ``(N,)`` int64: the segment of every original token.
    """

    features: torch.Tensor
    source: torch.Tensor
    sizes: torch.Tensor
    segments: torch.Tensor
    segment_of_token: torch.Tensor


def merge_video(
    features: torch.Tensor,
    groups: int,
    keep: int,
    cut_similarity: float = CUT_SIMILARITY,
    link_similarity: float = LINK_SIMILARITY,
    spatial_within: str = "group",
) -> MergedVideo:
    """One video's visual tokens ``(groups * S, D)`` (raster order: group, row, column) merged
    down to ``keep`` tokens: cuts, temporal runs, then spatial merging inside each frame group
    (``spatial_within="group"``) or across each segment (``"segment"``; see the module docstring). A video of one group merges spatially only. ``keep >= N``: nothing
    merges (the identity). The result depends on this video alone.
    """
    N, D = features.shape
    if groups < 1 or N % groups:
        raise ValueError(f"merge_video: {N} tokens do not split into {groups} frame groups")
    device = features.device
    S = N // groups
    identity = torch.arange(N, device=device)
    if keep >= N:
        segments = torch.zeros(groups, dtype=torch.long, device=device)
        return MergedVideo(
            features, identity, torch.ones(N, device=device), segments, segments.repeat_interleave(S)
        )
    with torch.no_grad():
        units = centred_units(features.detach().reshape(groups, S, D))
        segments = find_cuts(units, cut_similarity)
        links = temporal_runs(units, segments, N - keep, link_similarity).reshape(-1)
    segment_of_token = segments.repeat_interleave(S)
    # Runs: a token that does not link starts one; each token belongs to the run started at its
    # place by the latest start at or before its group.
    starts = ~links
    start_group = torch.where(starts.reshape(groups, S), torch.arange(groups, device=device)[:, None], -1)
    head_group = start_group.cummax(dim=0).values  # (T, S): the group of each token's run head
    head = (head_group * S + torch.arange(S, device=device)).reshape(-1)  # original index of the head
    run_of_head = starts.long().cumsum(0) - 1  # runs numbered in the order of their heads
    source = run_of_head[head]  # (N,)
    runs = int(starts.sum())
    sizes = torch.bincount(source, minlength=runs).to(torch.float32)
    work = torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
    x = torch.zeros(runs, D, dtype=work, device=device).index_add_(0, source, features.to(work))
    x = x / sizes[:, None].to(work)
    run_segment = segment_of_token[starts]
    if spatial_within == "group":  # spatial merges inside one frame group (a run: where it starts)
        run_segment = torch.arange(N, device=device)[starts] // S
    elif spatial_within != "segment":
        raise ValueError(f"spatial_within: expected 'group' or 'segment', got {spatial_within!r}")
    # Spatial: tome's bipartite soft matching on the runs, within segments (sequence ids).
    history = M.MergeHistory(source[None], sizes[None])
    x = x[None]
    ids = run_segment[None]
    mean = features.detach().float().mean(0)
    while x.shape[1] > keep:
        n = x.shape[1]
        # A-set tokens (even) that have a B-set token (odd) in their segment: the possible merges.
        b_count = torch.bincount(ids[0, 1::2], minlength=int(ids.max()) + 1)
        possible = int((b_count[ids[0, 0::2]] > 0).sum())
        r = min(n - keep, M.max_r(n), possible)
        if r <= 0:
            break  # one token per segment left: a cut is never crossed
        metric = x.detach().float() - mean  # centred, as the cuts and the runs
        plan = M.bipartite_soft_matching(metric, r, history, sequence_ids=ids)
        x = M.merge(plan, x, "mean")
        ids = M.merge(plan, ids, "amax")  # one segment per group: its id
        history = M.advance(history, plan)
    return MergedVideo(
        x[0].to(features.dtype), history.source[0], history.sizes[0], segments, segment_of_token
    )


def merge_videos(
    features: list[torch.Tensor], groups: list[int], video_ratio: float | None
) -> list[MergedVideo]:
    """Each video's features ``(groups[i] * S_i, D)`` merged by :func:`merge_video` to
    :func:`kept_video_tokens` of its tokens, one video at a time (each by its own similarities:
    a video's result does not depend on the others in its batch).

    >>> out = merge_videos([torch.randn(3 * 4, 8), torch.randn(2 * 9, 8)], [3, 2], 0.5)
    >>> [v.features.shape[0] for v in out], [v.source.shape[0] for v in out]
    ([6, 9], [12, 18])
    """
    return [
        merge_video(video, T, kept_video_tokens(video.shape[0], video_ratio))
        for video, T in zip(features, groups, strict=True)
    ]


def group_counts(source: torch.Tensor, groups: int) -> list[int]:
    """How many merged tokens *start* in each frame group of a video, given its source map
    ``(groups * S,)`` from :func:`merge_video` (a merged token starts in the group of the first
    original token it holds). :func:`merge_video` orders its merged tokens by that group, so
    group ``g``'s merged tokens are the ``g``-th block of this many: what a model that writes
    each frame group into its own run of placeholders (Qwen3-VL: timestamps between the
    groups) keeps of each run.

    >>> group_counts(torch.tensor([0, 1, 0, 2, 3, 3]), 3)  # groups of 2: tokens 0, 1 | 0, 2 | 3, 3
    [2, 1, 1]
    """
    k = int(source.max()) + 1 if source.numel() else 0
    S = source.shape[0] // groups
    first = torch.full((k,), source.shape[0], dtype=torch.long, device=source.device)
    first = first.scatter_reduce(0, source, torch.arange(source.shape[0], device=source.device), "amin")
    counts = torch.bincount(first // S, minlength=groups).tolist()
    starts = torch.repeat_interleave(
        torch.arange(groups, device=source.device), torch.tensor(counts, device=source.device)
    )
    if not torch.equal(first // S, starts):
        raise ValueError("group_counts: the merged tokens are not in the order of their frame groups")
    return counts


def forward_reduced_videos(
    model: torch.nn.Module, args: tuple, kwargs: dict, reduce: Reduce, handle: VisualHandle
) -> tuple | None:
    """:func:`~tome.adapters.common.vlm.forward_reduced`, for a forward whose prompt may hold
    videos and no images too (``pixel_values_videos`` given, ``pixel_values`` not): the same
    per-call key-bias handling (the bias set for a call from outside ``generate()``)."""
    if args or kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is None:
        return forward_reduced(model, args, kwargs, reduce, handle)
    slot = handle._slot
    top = not slot.generating
    if top:
        slot.bias = None  # a call of its own: no bias left from an earlier one
    reduced = reduce(kwargs.get("input_ids"), kwargs)
    if reduced is None:
        return None
    rewritten = reduced[0]
    bias = rewritten.pop(BIAS, None)
    if top and handle.visual_prop_attn:
        slot.bias = bias
    return (), rewritten


# -- the handle option ------------------------------------------------------------------------------


def _video_ratio(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(
            f"{name}: expected a number in [0, 1) (the fraction of each video's tokens merged away) "
            f"or None (videos unmerged), got {value!r}"
        )
    return float(value)


class VideoVisualHandle(VisualHandle):
    """``model.tome`` of a vision-language model that reads videos too: the options of
    :class:`~tome.adapters.common.vlm.VisualHandle` (images) and :attr:`video_ratio`.

    Attributes:
        video_ratio: the fraction of each video's visual tokens merged away, across frames
            first, then inside each scene (``0 <= video_ratio < 1``; ``None``: videos unmerged).
            Independent of ``visual_tokens`` / ``visual_ratio``, which set images.
    """

    video_ratio = Option(
        VIDEO_RATIO_DEFAULT,
        _video_ratio,
        "the fraction of each video's visual tokens merged away (across frames first, then "
        "inside each scene) before the language model",
    )

    def merges_images(self) -> bool:
        """Whether the image settings merge anything."""
        return super().merges()

    def merges_videos(self) -> bool:
        """Whether :attr:`video_ratio` merges anything."""
        return bool(self.video_ratio)

    def merges(self) -> bool:
        return self.merges_images() or self.merges_videos()

    def __repr__(self) -> str:
        return super().__repr__()[:-1].replace("VisualHandle(", "VideoVisualHandle(", 1) + (
            f", video_ratio={self.video_ratio!r})"
        )
