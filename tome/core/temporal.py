"""Temporal matching for video tubelets: merge a token into the token at its own place in the
time slice just before or after, before any other merge.

A video encoder (VideoMAE) reads a clip as ``T`` time slices of ``H x W`` tubelets each, in
raster order ``(t, h, w)``. Tome's default matching (:func:`tome.core.merge.bipartite_soft_matching`)
splits the tokens into sets A and B alternately along that order: with ``W`` even a token and
its twin at the same place in the next slice always fall in the same set, so the default
matching can *never* merge a still region's token with its own copy in the next slice. The
temporal matching partitions the tokens by time instead:

- **A**: the tokens of the odd slices (``t = 1, 3, ...``), **B**: those of the even slices.
- Each A token may merge only into the B token that holds the tubelet at its own place in the
  slice just before or just after (``window=1``), or at the places around it (``window=3``:
  the 3 x 3 places around, for motion), the better of them by cosine similarity of ``metric``.
- The ``r`` A tokens with the strongest edges merge, as in ToMe.

A *temporal phase* of several layers keeps that structure with no bookkeeping beyond the merge
history: only A tokens ever move and only B tokens receive, so an A token is still unmerged
exactly when its group has size 1, and its partner is whatever token now holds the B tubelet
next to it. The phase can remove at most the A tokens (:func:`temporal_capacity`: half the
tokens for an even ``T``); :func:`in_temporal_phase` says, from the token counts alone (no
read-back from the device), whether a layer still fits in it. After the phase a model falls back
to the default matching. Every decision is made on static shapes: the function runs under
``torch.compile`` like the default matching. Its cost is ``O(N * window^2 * D)``, below the
default matching's ``O(N^2 D)``.

>>> T, H, W = 4, 2, 2                       # 4 slices of 2 x 2 places: 16 tubelets
>>> place = torch.randn(1, 1, H * W, 8)
>>> still = place.expand(1, T, H * W, 8).reshape(1, T * H * W, 8)   # a still clip
>>> plan = temporal_soft_matching(still, 8, None, (T, H, W))
>>> # every odd-slice tubelet merged into the same place of an adjacent even slice
>>> [(int(s) // 4 % 2, int(s) % 4 == int(d) % 4) for s, d in zip(plan.src[0], plan.kept[0, plan.dst[0]])][:3]
[(1, True), (1, True), (1, True)]
>>> plan.sizes.shape, plan.sizes.sum().item()
(torch.Size([1, 8]), 16.0)
"""

from __future__ import annotations

import torch

from tome.core import matching
from tome.core import merge as M
from tome.core.merge import MergeHistory, MergePlan

__all__ = [
    "WINDOWS",
    "in_temporal_phase",
    "temporal_capacity",
    "temporal_partners",
    "temporal_soft_matching",
]

# The spatial neighbourhoods an A token may look in, in each adjacent slice: its own place (1)
# or the 3 x 3 places around it (3).
WINDOWS = (1, 3)


def temporal_capacity(grid: tuple[int, int, int]) -> int:
    """Tokens the temporal phase can remove: the odd slices' tubelets.

    >>> temporal_capacity((8, 14, 14)), temporal_capacity((1, 14, 14))
    (784, 0)
    """
    T, H, W = grid
    return (T // 2) * H * W


def in_temporal_phase(num_tokens: int, r: int, num_original: int, grid: tuple[int, int, int]) -> bool:
    """Whether a layer that removes ``r`` of its ``num_tokens`` tokens (of ``num_original`` at
    the start of the pass) merges by the temporal matching: the pass has the full grid and,
    after this layer, no more than :func:`temporal_capacity` tokens are gone (so every earlier
    merging layer was temporal too, and ``r`` unmerged A tokens are left).

    >>> [in_temporal_phase(n, 4, 16, (4, 2, 2)) for n in (16, 12, 8)]
    [True, True, False]
    """
    T, H, W = grid
    if r <= 0 or num_original != T * H * W:
        return False
    return num_original - (num_tokens - r) <= temporal_capacity(grid)


def temporal_partners(grid: tuple[int, int, int], window: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The A tubelets and, for each, its candidate B tubelets, as original token indices.

    Returns ``(a, partners)``: ``a`` ``(|A|,)`` the odd slices' tubelets in raster order;
    ``partners`` ``(|A|, K)`` the tubelets of the slices before and after at the places of the
    window (own place first, so ties go to it), ``-1`` where outside the clip.

    >>> a, p = temporal_partners((3, 1, 2))
    >>> a.tolist(), p.tolist()
    ([2, 3], [[0, 4], [1, 5]])
    """
    if window not in WINDOWS:
        raise ValueError(f"window: expected one of {', '.join(map(str, WINDOWS))}, got {window!r}")
    T, H, W = grid
    S = H * W
    t = torch.arange(1, T, 2)
    h = torch.arange(H)
    w = torch.arange(W)
    tt, hh, ww = (g.reshape(-1) for g in torch.meshgrid(t, h, w, indexing="ij"))
    half = window // 2
    offsets = [(0, 0)] + [
        (dh, dw) for dh in range(-half, half + 1) for dw in range(-half, half + 1) if (dh, dw) != (0, 0)
    ]
    columns = []
    for dh, dw in offsets:
        for dt in (-1, 1):
            nt, nh, nw = tt + dt, hh + dh, ww + dw
            inside = (nt >= 0) & (nt < T) & (nh >= 0) & (nh < H) & (nw >= 0) & (nw < W)
            columns.append(torch.where(inside, nt * S + nh * W + nw, -1))
    return tt * S + hh * W + ww, torch.stack(columns, dim=1)


def _unit(metric: torch.Tensor) -> torch.Tensor:
    # As the default matching: float32 cosines; a key with a NaN/inf entry counts as all zero.
    metric = metric.float()
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return unit.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, ...]]`` for ``x`` ``(B, N, D)`` and ``index`` ``(B, ...)``."""
    B = x.shape[0]
    flat = index.reshape(B, -1)
    out = x.gather(1, flat[..., None].expand(B, flat.shape[1], x.shape[-1]))
    return out.view(*index.shape, x.shape[-1])


def temporal_soft_matching(
    metric: torch.Tensor,
    r: int,
    history: MergeHistory | None,
    grid: tuple[int, int, int],
    window: int = 1,
    token_bias: torch.Tensor | None = None,
    normalized: bool = False,
) -> MergePlan:
    """Plan the merge of the ``r`` A tokens most similar to a B token next to them in time (see
    the module docstring). No argument checking beyond the layout.

    Args:
        metric: ``(B, N, D)`` similarity features of the current tokens.
        r: tokens to remove; the layer must be in the temporal phase
            (:func:`in_temporal_phase`), so that ``r`` unmerged A tokens are left.
        history: the merge history of the pass so far (``None``: nothing merged yet); it must
            come from temporal merges only (the phase).
        grid: ``(T, H, W)``: time slices and places of the original tokens, raster order.
        window: ``1`` (own place) or ``3`` (the 3 x 3 places around it) in each adjacent slice.
        token_bias: optional ``(B, N)`` term added to every edge's score at both its tokens
            (as :func:`tome.core.merge.bipartite_soft_matching`).
        normalized: ``metric`` is unit-norm per token already.

    Returns:
        The :class:`~tome.core.merge.MergePlan`; the surviving tokens keep their order.
    """
    B, N = metric.shape[:2]
    device = metric.device
    T, H, W = grid
    if history is None:
        history = M.start_history(B, N, device)
    if history.num_original != T * H * W:
        raise ValueError(
            f"grid: {T} x {H} x {W} = {T * H * W} tubelets, but the pass started with "
            f"{history.num_original} tokens"
        )
    if r == 0:
        return matching.bipartite_soft_matching(metric, 0, history)
    with torch.no_grad():
        a, partners = (t.to(device) for t in temporal_partners(grid, window))
        source = history.source
        current_a = source[:, a]  # (B, |A|): the token holding each A tubelet now
        inside = partners >= 0
        current_p = source[:, partners.clamp_min(0).reshape(-1)].view(B, *partners.shape)
        unit = metric if normalized else _unit(metric)
        unit = unit.float()
        scores = (_gather(unit, current_a)[:, :, None, :] * _gather(unit, current_p)).sum(-1)
        if token_bias is not None:
            bias = token_bias.float()
            scores = scores + bias.gather(1, current_a)[:, :, None]
            scores = scores + bias.gather(1, current_p.reshape(B, -1)).view_as(scores)
        # Only an A tubelet still alone may move (one already merged shares its B token's group).
        alone = history.sizes.gather(1, current_a) == 1
        allowed = inside[None] & alone[:, :, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        # argmax gives the first maximum: ties go to the own place, the slice before first.
        best, choice = scores.amax(dim=-1), scores.argmax(dim=-1)
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices[:, :r]
        src = current_a.gather(1, order)
        dst_in = current_p.gather(2, choice[..., None]).squeeze(-1).gather(1, order)
        return matching._plan_from_sources(src, dst_in, history.sizes, N, r)
