"""Pure tensor functions for merging tokens on a 2-D grid (tomesd's "random 2d" bipartite
matching; Bolya & Hoffman, "Token Merging for Fast Stable Diffusion", CVPRW 2023).

The ``h x w`` tokens of one resolution (row-major, as diffusers flattens feature maps) are split
into destinations (set B) and sources (set A): the grid is cut into ``sy x sx`` cells, and each
complete cell gives one destination, its top-left token or, with a ``generator``, a random one.
Rows and columns left over when ``sy`` / ``sx`` do not divide ``h`` / ``w`` hold sources only.
Then, as in ToMe, every source draws an edge to its most similar destination (cosine
similarity of ``metric``) and the ``r`` sources with the strongest edges merge into their
destinations. The result is an ordinary :class:`~tome.core.merge.MergePlan`, so
:func:`tome.core.merge.merge` and :func:`tome.core.merge.unmerge` apply it.

The partition is shared by the whole batch (as in tomesd); the matching is per sample. Nothing
here is an ``nn.Module`` or keeps state; the only randomness is the ``generator`` passed in.
"""

from __future__ import annotations

import torch

from tome.core import matching
from tome.core.merge import MergePlan

__all__ = [
    "grid_destinations",
    "grid_partition",
    "hashed_offsets",
    "keep_prefix",
    "mix32",
    "random2d_matching",
]

_MASK32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash ("lowbias32", C. Wellons) of int64 ``x``, elementwise, in int64
    arithmetic: values in ``[0, 2**32)``. Products wrap modulo ``2**64``, and only their low 32
    bits are kept, so the result is the same on every device.

    >>> mix32(torch.tensor([0, 1, 2])).tolist()
    [0, 1753845952, 3507691905]
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def hashed_offsets(count: int, modulus: int, key: torch.Tensor | int, device=None) -> torch.Tensor:
    """``count`` int64 values in ``[0, modulus)`` from a counter-based hash of ``(key, i)``: a
    random choice per cell that needs no generator and no host-device copy (``key`` may be a
    0-dim tensor on the device, e.g. computed from a timestep there), and is the same for the
    same key in any thread, process or compiled graph.

    >>> hashed_offsets(4, 4, 7).tolist() == hashed_offsets(4, 4, torch.tensor(7)).tolist()
    True
    """
    if not isinstance(key, torch.Tensor):
        key = torch.tensor(key, dtype=torch.long, device=device)
    counter = torch.arange(count, device=key.device if device is None else device)
    return mix32(counter + mix32(key.long()) * 0x9E3779B9) % modulus


def grid_destinations(
    h: int,
    w: int,
    sx: int,
    sy: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    key: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """``(h // sy) * (w // sx)`` int64 token indices (row-major in ``h x w``), one per complete
    ``sy x sx`` cell, in cell order: the cell's top-left token, or with ``generator`` a token
    drawn uniformly from the cell (``torch.randint(sx * sy, ...)`` on the generator's device),
    or with ``key`` a token chosen by :func:`hashed_offsets` (no generator, no host sync).

    >>> grid_destinations(4, 5, 2, 2).tolist()  # the fifth column is left over
    [0, 2, 10, 12]
    """
    cells_y, cells_x = h // sy, w // sx
    if key is not None:
        offset = hashed_offsets(cells_y * cells_x, sx * sy, key, device).view(cells_y, cells_x)
        offset = offset.to(device)
    elif generator is None:
        offset = torch.zeros(cells_y, cells_x, dtype=torch.long, device=device)
    else:
        offset = torch.randint(sx * sy, (cells_y, cells_x), generator=generator, device=generator.device)
        offset = offset.to(device)
    rows = torch.arange(cells_y, device=device)[:, None] * sy + offset // sx
    cols = torch.arange(cells_x, device=device)[None, :] * sx + offset % sx
    return (rows * w + cols).reshape(-1)


def grid_partition(
    h: int,
    w: int,
    sx: int,
    sy: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    key: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src, dst)``: the source tokens (every token that is not a destination, in token order)
    and the destinations of :func:`grid_destinations`; together a permutation of ``h * w``.

    >>> src, dst = grid_partition(2, 3, 2, 2)
    >>> src.tolist(), dst.tolist()
    ([1, 2, 3, 4, 5], [0])
    """
    dst = grid_destinations(h, w, sx, sy, generator, device, key)
    is_dst = torch.zeros(h * w, dtype=torch.bool, device=dst.device).scatter_(0, dst, True)
    # A stable sort puts the sources (False) first in token order; no boolean indexing, so no
    # data-dependent shape and no host-device sync.
    order = torch.sort(is_dst.to(torch.uint8), stable=True).indices
    return order[: h * w - dst.numel()], dst


def random2d_matching(
    metric: torch.Tensor,
    h: int,
    w: int,
    sx: int,
    sy: int,
    r: int,
    generator: torch.Generator | None = None,
    key: torch.Tensor | int | None = None,
) -> MergePlan | None:
    """Plan the merge of ``r`` of the ``h * w`` tokens of ``metric`` ``(B, h * w, C)`` into the
    grid's destinations (tomesd's ``bipartite_soft_matching_random2d``); ``r`` is capped at the
    number of sources; ``generator`` or ``key``: random destinations (see
    :func:`grid_destinations`). ``None`` when nothing merges (``r == 0``, or the grid is smaller than one
    cell). Matching carries no gradient; the plan's merges do.

    Equal scores resolve deterministically (sources by token order, destinations to the
    lowest index); tomesd's unstable sort may break exact ties differently.

    >>> plan = random2d_matching(torch.randn(2, 16, 8), 4, 4, 2, 2, r=6)
    >>> plan.kept.shape
    torch.Size([2, 10])
    """
    B, N = metric.shape[:2]
    if h * w != N:
        raise ValueError(f"metric: expected {h} x {w} = {h * w} tokens, got {N}")
    num_dst = (h // sy) * (w // sx)
    r = min(r, N - num_dst)
    if r <= 0 or num_dst == 0:
        return None
    with torch.no_grad():
        src, dst = grid_partition(h, w, sx, sy, generator, metric.device, key)
        unit = matching._normalize(metric)
        a_local, b_local = matching._edges_in_blocks(unit[:, src], unit[:, dst], r)
        sizes = torch.ones(B, N, device=metric.device)
        return matching._plan_from_sources(src[a_local], dst[b_local], sizes, N, r)


def keep_prefix(plan: MergePlan, count: int) -> MergePlan:
    """``plan`` for a sequence with ``count`` more tokens in front (text tokens of a joint
    text + image sequence), which it keeps as they are, at the front, in order.

    >>> plan = random2d_matching(torch.randn(1, 16, 8), 4, 4, 2, 2, r=6)
    >>> joint = keep_prefix(plan, 3)
    >>> joint.index.shape, joint.kept[0, :3].tolist(), joint.r
    (torch.Size([1, 19]), [0, 1, 2], 6)
    """
    if count == 0:
        return plan
    B, device = plan.index.shape[0], plan.index.device
    front = torch.arange(count, device=device).expand(B, count)
    ones = torch.ones(B, count, device=device, dtype=plan.sizes.dtype)
    return MergePlan(
        index=torch.cat([front, plan.index + count], dim=1),
        kept=torch.cat([front, plan.kept + count], dim=1),
        src=plan.src + count,
        dst=plan.dst + count,
        sizes=torch.cat([ones, plan.sizes], dim=1),
        in_sizes=torch.cat([ones, plan.in_sizes], dim=1),
    )
