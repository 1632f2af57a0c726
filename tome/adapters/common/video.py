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
   gives that variant). The budget is spent on the most similar pairs of the whole video
   first; ``spatial_quota`` gives each group a share of its own instead, and ``min_run``
   keeps only long runs: both measured on the proxy, neither the default (docs/video.md).

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
    "group_quotas",
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
    units: torch.Tensor,
    segments: torch.Tensor,
    max_links: int,
    threshold: float = LINK_SIMILARITY,
    min_run: int | str = 1,
) -> torch.Tensor:
    """``(T, S)`` bool: which tokens join the run of the token at the same place one group
    earlier (a *link*). A token links when it is in the same segment and its cosine to its run's
    first token is at least ``threshold``; runs covering fewer than ``min_run`` groups
    (``"segment"``: all the groups of their segment) are undone (their tokens stay apart: only
    long, still runs merge in time); of the links, at most ``max_links`` (the most similar)
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
    if min_run == "segment" or min_run > 1:  # every token's run length: (place, run number)
        run = (~links).long().cumsum(0) * S + torch.arange(S, device=units.device)
        length = torch.bincount(run.reshape(-1))[run]
        need = torch.bincount(segments)[segments][:, None] if min_run == "segment" else min_run
        links = links & (length >= need)
        score = torch.where(links, score, float("-inf"))
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


def group_quotas(runs: torch.Tensor, keep: int, quota: str) -> torch.Tensor:
    """``(T,)`` int64: how many merged tokens each frame group keeps, given ``runs`` ``(T,)``
    (the run tokens starting in each group after the temporal step) and the video's ``keep``.

    ``quota="runs"``: shares proportional to ``runs``; ``"equal"``: the same share for every
    group that has runs. Either way a group with runs keeps at least 1 and at most all of them,
    and the shares sum to ``max(keep, groups with runs)`` (what a group cannot use goes to the
    others; largest remainders round).

    >>> group_quotas(torch.tensor([256, 4, 0, 40]), 60, "runs").tolist()
    [51, 1, 0, 8]
    >>> group_quotas(torch.tensor([256, 4, 0, 40]), 60, "equal").tolist()
    [28, 4, 0, 28]
    """
    if quota not in ("runs", "equal"):
        raise ValueError(f"spatial_quota: expected 'global', 'runs' or 'equal', got {quota!r}")
    high = runs.double()
    low = (runs > 0).double()
    total = min(max(keep, int(low.sum())), int(runs.sum()))
    weight = high if quota == "runs" else low
    # Water-filling: the scale at which the clamped shares sum to the total (monotone: bisect).
    lo_s, hi_s = 0.0, float(total) / max(float(weight[weight > 0].min()), 1e-9) + 1.0
    for _ in range(60):
        mid = (lo_s + hi_s) / 2
        if float(torch.minimum(torch.maximum(mid * weight, low), high).sum()) < total:
            lo_s = mid
        else:
            hi_s = mid
    share = torch.minimum(torch.maximum(hi_s * weight, low), high)
    base = share.floor()
    left = total - int(base.sum())
    if left > 0:  # largest remainders first, among groups that can take one more (stable order)
        room = (base < high).double()
        order = torch.sort((share - base) * room - (1 - room), descending=True, stable=True).indices
        base[order[:left]] += 1
    elif left < 0:  # only from float rounding: give back from the smallest remainders, above 1
        room = (base > low).double()
        order = torch.sort((share - base) + 2 * (1 - room), stable=True).indices
        base[order[:-left]] -= 1
    return base.long()


def _merge_each_group(
    metric: torch.Tensor, sizes: torch.Tensor, run_group: torch.Tensor, quotas: torch.Tensor
) -> torch.Tensor:
    """``(R,)`` int64: the merged token holding each run (runs in group order, as
    :func:`merge_video` numbers them), each frame group's runs merged alone (bipartite soft
    matching on ``metric``, weighted by the runs' ``sizes``, repeated) down to its quota. The
    merged tokens come group by group, inside a group in the order bipartite matching keeps
    (a merge at the token it merged into). Groups of one run count and one quota go through
    the matching together (one batch), as images of one size do: rows never interact."""
    device = metric.device
    counts = torch.bincount(run_group, minlength=quotas.shape[0])
    firsts = torch.cumsum(counts, 0) - counts
    offsets = torch.cumsum(quotas, 0) - quotas
    # Unmerged groups (quota = run count): each run is its own token.
    final = offsets[run_group] + torch.arange(metric.shape[0], device=device) - firsts[run_group]
    batches: dict[tuple[int, int], list[int]] = {}
    for g, (n, k) in enumerate(zip(counts.tolist(), quotas.tolist(), strict=True)):
        if n > k:
            batches.setdefault((n, k), []).append(g)
    for (n, k), members in batches.items():
        index = firsts[members][:, None] + torch.arange(n, device=device)  # (G, n) run indices
        x = metric[index]
        history = M.MergeHistory(torch.arange(n, device=device).expand(len(members), n), sizes[index])
        while x.shape[1] > k:
            r = min(x.shape[1] - k, M.max_r(x.shape[1]))
            plan = M.bipartite_soft_matching(x, r, history)
            x = M.merge(plan, x, "mean")
            history = M.advance(history, plan)
        final[index] = offsets[members][:, None] + history.source
    return final


def merge_video(
    features: torch.Tensor,
    groups: int,
    keep: int,
    cut_similarity: float = CUT_SIMILARITY,
    link_similarity: float = LINK_SIMILARITY,
    spatial_within: str = "group",
    spatial_quota: str = "global",
    min_run: int | str = 1,
) -> MergedVideo:
    """One video's visual tokens ``(groups * S, D)`` (raster order: group, row, column) merged
    down to ``keep`` tokens: cuts, temporal runs, then spatial merging inside each frame group
    (``spatial_within="group"``) or across each segment (``"segment"``; see the module
    docstring). A video of one group merges spatially only. ``keep >= N``: nothing merges (the
    identity). The result depends on this video alone.

    ``spatial_quota`` (frame groups only): ``"global"`` spends the spatial budget on the most
    similar pairs of the whole video first (a group may lose more than another);
    ``"runs"`` / ``"equal"`` give each frame group its own share (:func:`group_quotas`) and
    merge each group alone down to it. ``min_run``: temporal runs shorter than this many
    groups (``"segment"``: than their segment) are undone (:func:`temporal_runs`): time merges
    only where a region stays still long, moving regions merge inside their frame.
    """
    N, D = features.shape
    if groups < 1 or N % groups:
        raise ValueError(f"merge_video: {N} tokens do not split into {groups} frame groups")
    if spatial_within not in ("group", "segment"):
        raise ValueError(f"spatial_within: expected 'group' or 'segment', got {spatial_within!r}")
    if spatial_quota not in ("global", "runs", "equal"):
        raise ValueError(f"spatial_quota: expected 'global', 'runs' or 'equal', got {spatial_quota!r}")
    if min_run != "segment" and (
        isinstance(min_run, bool) or not isinstance(min_run, int | float) or min_run < 1 or min_run % 1
    ):
        raise ValueError(
            f"min_run: expected a whole number of frame groups >= 1 or 'segment', got {min_run!r}"
        )
    if spatial_quota != "global" and spatial_within != "group":
        raise ValueError(
            f"spatial_quota={spatial_quota!r} shares the budget among frame groups: it needs "
            f"spatial_within='group', got {spatial_within!r}"
        )
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
        need = min_run if min_run == "segment" else int(min_run)
        links = temporal_runs(units, segments, N - keep, link_similarity, need).reshape(-1)
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
    if spatial_quota != "global":
        runs_per_group = torch.bincount(run_segment, minlength=groups)
        quotas = group_quotas(runs_per_group, keep, spatial_quota)
        mean = features.detach().float().mean(0)
        with torch.no_grad():
            final = _merge_each_group(x.detach().float() - mean, sizes, run_segment, quotas)
        source = final[source]
        sizes = torch.bincount(source).to(torch.float32)
        out = torch.zeros(sizes.shape[0], D, dtype=work, device=device).index_add_(
            0, source, features.to(work)
        )
        out = out / sizes[:, None].to(work)  # exact size-weighted means of the original tokens
        return MergedVideo(out.to(features.dtype), source, sizes, segments, segment_of_token)
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
