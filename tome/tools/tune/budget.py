"""The FLOP model of :func:`tome.tune`: tokens and FLOPs per image of an ``r`` schedule, and the
smallest ramp or scaling of a schedule that fits a FLOP budget. Arithmetic only: no model runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tome.core.merge import max_r
from tome.core.schedule import resolve_schedule

__all__ = [
    "FlopModel",
    "best_reachable",
    "effective_schedule",
    "ramp_within",
    "scaled_within",
    "schedule_flops",
    "schedule_tokens",
]


def schedule_tokens(schedule: Sequence[int], n0: int, protected: int) -> list[int]:
    """Tokens entering block 0, then left after each block, for a per-layer ``schedule``: the
    counts ``model.tome.tokens_per_layer`` reports (each block capped at what it can merge)."""
    tokens = [n0]
    n = n0
    for r in schedule:
        n -= min(int(r), max_r(n, protected))
        tokens.append(n)
    return tokens


def effective_schedule(schedule: Sequence[int], n0: int, protected: int) -> list[int]:
    """What each block of ``schedule`` really merges (capped at what it can)."""
    tokens = schedule_tokens(schedule, n0, protected)
    return [a - b for a, b in itertools.pairwise(tokens)]


def schedule_flops(model, schedule: Sequence[int]) -> float:
    """FLOPs per image of ``model`` (a :class:`tome.tools.models.vision.Model`) merging with ``schedule``."""
    from tome.tools.measure.bench import flops_per_image

    n0 = model.protected + model.num_patches
    return flops_per_image(model, schedule_tokens(schedule, n0, model.protected))


class FlopModel:
    """The FLOP model of one model, with per-block constants precomputed (called thousands of
    times by the search)."""

    def __init__(self, model) -> None:
        from tome.tools.measure.bench import block_macs

        self.C = model.width
        self.n0 = model.protected + model.num_patches
        self.protected = model.protected
        self.blocks = [block_macs(block, self.C) for block in model.blocks]
        self.fixed = model.num_patches * self.C * 3 * model.patch_size**2
        self.base = self([0] * len(self.blocks))

    def __call__(self, schedule: Sequence[int]) -> float:
        tokens = schedule_tokens(schedule, self.n0, self.protected)
        macs = self.fixed
        for i, (attn, mlp) in enumerate(self.blocks):
            n_in, n_out = tokens[i], tokens[i + 1]
            macs += n_in * attn + 2 * n_in * n_in * self.C + n_out * mlp
        return 2.0 * macs

    def speedup(self, schedule: Sequence[int]) -> float:
        return self.base / self(schedule)


def ramp_within(flops: FlopModel, budget: float, inflection: float, layers: int) -> list[int] | None:
    """Smallest ramp ``(r, inflection)`` (r a float, bisected) with FLOPs <= budget."""
    hi = float(flops.n0)
    top = effective_schedule(resolve_schedule((hi, inflection), layers), flops.n0, flops.protected)
    if flops(top) > budget:
        return None
    lo = 0.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if flops(resolve_schedule((mid, inflection), layers)) <= budget:
            hi = mid
        else:
            lo = mid
    return effective_schedule(resolve_schedule((hi, inflection), layers), flops.n0, flops.protected)


def scaled_within(flops: FlopModel, budget: float, schedule: Sequence[int]) -> list[int] | None:
    """``schedule`` scaled by the smallest factor (bisected) that brings it within budget."""
    if sum(schedule) == 0:
        return None
    hi = 1.0
    while flops([round(hi * r) for r in schedule]) > budget:
        hi *= 2
        if hi > 4 * flops.n0:
            return None
    lo = 0.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if flops([round(mid * r) for r in schedule]) <= budget:
            hi = mid
        else:
            lo = mid
    return effective_schedule([round(hi * r) for r in schedule], flops.n0, flops.protected)


def best_reachable(flops: FlopModel, layers: int) -> float:
    """The speedup of merging all a block can, in every block."""
    return flops.speedup([flops.n0] * layers)
