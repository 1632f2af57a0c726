"""Pure tensor functions for token merging: merging, unmerging, source maps (the matching that
plans a merge is :mod:`tome.core.matching`; its functions are also reachable from here).

Nothing here is an ``nn.Module`` and nothing keeps state: a merge step is described by a
:class:`MergePlan` (index tensors), and the history of a chain of merges by a
:class:`MergeHistory` (an index map from original tokens to current tokens, and group sizes).

All functions are free of host-device synchronisation and data-dependent shapes, so they run
under ``torch.compile(fullgraph=True)`` and inside CUDA graphs.

Surviving tokens keep their relative order, so the first ``protected`` tokens (class token,
registers, ...) stay at the front, in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "MODES",
    "MergeHistory",
    "MergePlan",
    "add_rows",
    "attention_bias",
    "dense_adjacency",
    "max_r",
    "merge",
    "merge_original",
    "merge_residuals",
    "start_history",
    "unmerge",
]

MODES = ("mean", "sum", "amax", "amin", "drop", "mlerp")


@dataclass(frozen=True)
class MergeHistory:
    """What a chain of merges has done so far; pass it to the next layer's merger.

    Attributes:
        source: ``(B, N0)`` int64: for every original token, the index of the current token
            that holds it.
        sizes: ``(B, N)`` float32: how many original tokens each current token holds (exact
            integers; they sum to ``N0`` per sample).
    """

    source: torch.Tensor
    sizes: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Current sequence length ``N``."""
        return self.sizes.shape[1]

    @property
    def num_original(self) -> int:
        """Original sequence length ``N0``."""
        return self.source.shape[1]

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(B, N, N0)`` 0/1 matrix (the seed's "adjacency matrix"): entry ``[b, i, j]`` is
        1 when original token ``j`` belongs to current token ``i``. Memory O(B·N·N0): only for
        inspection, never used on the hot path."""
        return dense_adjacency(self.source, self.num_tokens, dtype)


@dataclass(frozen=True)
class MergePlan:
    """One merge step from ``N`` to ``N - r`` tokens, as index tensors.

    Attributes:
        index: ``(B, N)`` int64: position in the merged sequence of every input token.
        kept: ``(B, N - r)`` int64: input token at each merged position before merging (the
            destination, for positions that receive merged tokens).
        src: ``(B, r)`` int64: input tokens that are merged away.
        dst: ``(B, r)`` int64: merged position each ``src`` token goes into.
        sizes: ``(B, N - r)`` float32: group sizes after the merge (counting original tokens).
        in_sizes: ``(B, N)`` float32: group sizes before the merge.
    """

    index: torch.Tensor
    kept: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    sizes: torch.Tensor
    in_sizes: torch.Tensor

    @property
    def r(self) -> int:
        return self.src.shape[1]


def start_history(batch: int, num_tokens: int, device: torch.device | str | None = None) -> MergeHistory:
    """The history of a sequence nothing has been merged in yet: identity map, sizes 1.

    >>> h = start_history(2, 5)
    >>> h.source.shape, h.sizes.sum(1).tolist()
    (torch.Size([2, 5]), [5.0, 5.0])
    """
    source = torch.arange(num_tokens, device=device).expand(batch, num_tokens)
    sizes = torch.ones(batch, num_tokens, device=device)
    return MergeHistory(source, sizes)


def max_r(num_tokens: int, protected: int = 0) -> int:
    """Largest ``r`` bipartite matching allows: half the unprotected tokens (set B's size).

    >>> max_r(197, protected=1)
    98
    """
    return max(num_tokens - protected, 0) // 2


def _expand_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a ``(B, K)`` token index over the trailing dims of ``like`` for gather/scatter."""
    shape = index.shape + like.shape[2:]
    return index.view(index.shape + (1,) * (like.dim() - 2)).expand(shape)


def _reduce_dtype(x: torch.Tensor) -> torch.dtype:
    # Half-precision sums of many tokens lose precision (bf16) or overflow (fp16): accumulate in
    # float32 and cast back.
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call when it has that dtype (a no-op ``to`` still goes
    through the dispatcher: microseconds on every merge step)."""
    return t if t.dtype == dtype else t.to(dtype)


def _l2(t: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """L2 norm over the last dim: ``t.norm(dim=-1)``, the same kernel called directly
    (``Tensor.norm`` goes through a Python wrapper, ~10 microseconds a call)."""
    return torch.linalg.vector_norm(t, dim=-1, keepdim=keepdim)


def _rows(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``(B, K)`` token index -> ``(B * K,)`` row index into ``x.reshape(B * num_tokens, ...)``."""
    if num_tokens == 0:  # no rows to point at (and arange takes no step 0)
        return index.reshape(-1)
    # one arange with a step (not arange, then a multiply): one op fewer per call
    offset = torch.arange(0, index.shape[0] * num_tokens, num_tokens, device=index.device)
    return (index + offset[:, None]).reshape(-1)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, k]]`` for ``x`` ``(B, N, ...)`` and ``index`` ``(B, K)``: ``(B, K, ...)``.

    One ``index_select`` of whole rows: several times faster on CPU than ``gather`` with an
    index expanded over the features."""
    B, N = x.shape[:2]
    rows = x.reshape(B * N, *x.shape[2:]).index_select(0, _rows(index, N))
    return rows.view(B, index.shape[1], *x.shape[2:])


def _row_major(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A contiguous ``(B, K, ...)`` tensor as ``(B * K, F, 1)`` rows for ``index_add_``. In this
    3-d form CPU ``index_add_`` adds the rows in a serial loop over the index; on a 2-d
    ``(rows, F)`` tensor it takes a sort-based scatter path that opens parallel regions (each
    waits for every thread: slow on a busy machine) and is ~10x slower even idle. Same sums,
    same order (rows in index order)."""
    return t.view(rows, math.prod(t.shape[2:]), 1)


def _scatter_into_kept(plan: MergePlan, x: torch.Tensor, reduce: str) -> torch.Tensor:
    out = _gather_tokens(x, plan.kept)
    moved = _gather_tokens(x, plan.src)
    if reduce == "sum" and out.is_floating_point():
        B, K = out.shape[:2]
        _row_major(out, B * K).index_add_(0, _rows(plan.dst, K), _row_major(moved, B * plan.r))
        return out
    dst = _expand_index(plan.dst, moved)
    if reduce == "sum":
        return out.scatter_add_(1, dst, moved)
    return out.scatter_reduce_(1, dst, moved, reduce=reduce, include_self=True)


def _mean(
    plan: MergePlan,
    x: torch.Tensor,
    moved: torch.Tensor,
    target: torch.Tensor,
    src_sizes: torch.Tensor,
    dst_rows: torch.Tensor,
) -> torch.Tensor:
    """Size-weighted mean of every group. Beyond the gather of the kept tokens, only the ``r``
    moved rows are touched: a destination ``d`` (size ``s_d``) that receives tokens ``i``
    (sizes ``s_i``; new size ``S = s_d + sum_i s_i``) becomes

        (s_d x_d + sum_i s_i x_i) / S  =  x_d + sum_i (s_i / S) (x_i - x_d),

    one ``index_add_`` of a term per moved token; every other kept token is its own mean.
    ``moved`` / ``target``: the moved tokens and their destinations' input rows
    (:func:`_moved_and_targets`); ``src_sizes``: the moved tokens' sizes; ``dst_rows``: the
    destinations as rows of the flattened output (``_rows(plan.dst, N - r)``). Three ops on
    ``(B, r, ...)`` rows and one gather of the kept tokens: few parallel regions (see
    :func:`_row_major`)."""
    B, N = x.shape[:2]
    K = N - plan.r
    out = _as(_gather_tokens(x, plan.kept), moved.dtype)
    weight_dtype = out.real.dtype if out.is_complex() else out.dtype
    # clamp: a group of padding tokens has size 0 (it merges nothing real: weight 0, not NaN)
    weight = _as(src_sizes, weight_dtype) / plan.sizes.gather(1, plan.dst).clamp_min(1e-12)
    term = torch.sub(moved, target).mul_(weight.view(weight.shape + (1,) * (x.dim() - 2)))
    _row_major(out, B * K).index_add_(0, dst_rows, _row_major(term, B * plan.r))
    return out


def _moved_and_targets(plan: MergePlan, x: torch.Tensor, src_sizes: torch.Tensor) -> torch.Tensor:
    """The ``r`` moved tokens, then the input rows of their destinations: ``(B, 2r, ...)`` in
    the reduction dtype, one gather for both the mean and mlerp's rescaling. A token of size 0
    (``src_sizes``: the moved tokens' sizes; padding) holds nothing: it reads its destination's
    row instead of its own, so its term ``x_d - x_d`` is 0 and its norm is its destination's
    (it changes nothing, whatever padding carries, NaN included)."""
    dst_in = plan.kept.gather(1, plan.dst)
    src = torch.where(src_sizes == 0, dst_in, plan.src)
    return _as(_gather_tokens(x, torch.cat([src, dst_in], dim=1)), _reduce_dtype(x))


def _feature_norm(x: torch.Tensor) -> torch.Tensor:
    return _l2(x.flatten(2)) if x.dim() > 2 else x.abs()


def merge(plan: MergePlan, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Apply a merge step to ``x`` of shape ``(B, N, ...)``; returns ``(B, N - r, ...)``.

    Modes: ``"mean"`` (weighted by group sizes: the exact mean over the original tokens),
    ``"sum"``, ``"amax"``, ``"amin"``, ``"drop"`` (merged-away tokens are discarded) and
    ``"mlerp"`` (the mean, rescaled to the largest feature norm in its group: Kim et al.,
    "Token Fusion", WACV 2024). Integer and bool tensors keep their dtype (``sum`` of bools is a
    logical or); ``mean`` and ``mlerp`` need floating point. No argument checking: see
    :meth:`tome.TokenMerger.merge`.

    >>> from tome.core.matching import bipartite_soft_matching
    >>> plan = bipartite_soft_matching(torch.randn(2, 9, 4), r=3, protected=1)
    >>> x = torch.randn(2, 9, 8)
    >>> merge(plan, x).shape, merge(plan, x, "mlerp").shape
    (torch.Size([2, 6, 8]), torch.Size([2, 6, 8]))
    """
    if plan.r == 0:
        return x
    if mode == "drop":
        return _gather_tokens(x, plan.kept)
    if x.dtype == torch.bool:
        reduce = "amin" if mode == "amin" else "amax"
        return _scatter_into_kept(plan, x.to(torch.uint8), reduce).bool()
    if mode in ("sum", "amax", "amin"):
        work = x.to(_reduce_dtype(x))
        return _scatter_into_kept(plan, work, mode).to(x.dtype)
    x = x.contiguous()
    # Shared by the steps below (each was computed twice before: every small op costs a few
    # microseconds on CPU, more than its arithmetic).
    src_sizes = plan.in_sizes.gather(1, plan.src)
    dst_rows = _rows(plan.dst, x.shape[1] - plan.r)
    both = _moved_and_targets(plan, x, src_sizes)
    if _reduce_dtype(x) != x.dtype:
        return _merge_low_precision(plan, x, both, mode, src_sizes, dst_rows)
    out = _mean(plan, x, both[:, : plan.r], both[:, plan.r :], src_sizes, dst_rows)
    if mode == "mlerp":
        _rescale_destinations(plan, out, both, dst_rows)
    return _as(out, x.dtype)


def _last_of_each_destination(plan: MergePlan) -> torch.Tensor:
    """``(B, r)`` int64: for every moved token, the index (among the ``r``) of the last moved
    token that goes to the same destination: one representative per destination."""
    B, r = plan.dst.shape
    order = torch.arange(r, device=plan.dst.device).expand(B, r)
    last = torch.zeros(B, plan.sizes.shape[1], dtype=torch.long, device=plan.dst.device)
    return last.scatter_reduce_(1, plan.dst, order, reduce="amax").gather(1, plan.dst)


def _copy_destinations(
    out: torch.Tensor, plan: MergePlan, rows: torch.Tensor, last: torch.Tensor | None, dst_rows: torch.Tensor
) -> None:
    """``out[b, dst[b, i]] = rows[b, i]`` in place (one serial 2-d ``index_copy_``; ``dst_rows``:
    ``_rows(plan.dst, N - r)``); every moved token of a destination carries the same row, so
    the order of the writes does not matter. With gradients, only the destination's
    representative (``last``: :func:`_last_of_each_destination`) passes them back: the copy's
    backward hands the destination's gradient to every entry that names it, which counted it
    once per token."""
    B, kept = out.shape[:2]
    if rows.requires_grad:
        if last is None:
            last = _last_of_each_destination(plan)
        own = last == torch.arange(plan.r, device=last.device)
        rows = torch.where(own.view(own.shape + (1,) * (rows.dim() - 2)), rows, rows.detach())
    width = math.prod(out.shape[2:])
    target, values = out.view(B * kept, width), rows.reshape(B * plan.r, width)
    if not (out.requires_grad or rows.requires_grad or torch.compiler.is_compiling()):
        # A copy of bits: CPU index_copy_ costs per element, so rows of 2-byte (or 4-byte)
        # entries are copied as 8-byte words (bf16 rows: ~1.7x faster). Same bits written.
        words = width * out.element_size()
        if out.element_size() < 8 and words % 8 == 0 and out.dtype == values.dtype:
            target = target.view(torch.int64)
            values = values.contiguous().view(torch.int64)
    target.index_copy_(0, dst_rows, values)


def _merge_low_precision(
    plan: MergePlan,
    x: torch.Tensor,
    both: torch.Tensor,
    mode: str,
    src_sizes: torch.Tensor,
    dst_rows: torch.Tensor,
) -> torch.Tensor:
    """``mean`` / ``mlerp`` of a half-precision ``x``: the kept tokens are gathered as they are
    (no float32 copy of the whole sequence and back: that was half of a bf16 merge step); only
    the destinations' new values are computed in float32 (``both``: :func:`_moved_and_targets`)
    and rounded once, as the float32 path rounds them. Every destination's terms are summed into
    the row of one of its moved tokens (its representative: the last one), then every moved
    token's row holds its destination's value, written with one ``index_copy_``."""
    B, N = x.shape[:2]
    r, K = plan.r, N - plan.r
    moved, target = both[:, :r], both[:, r:]
    weight = src_sizes / plan.sizes.gather(1, plan.dst).clamp_min(1e-12)
    term = torch.sub(moved, target).mul_(weight.view(weight.shape + (1,) * (x.dim() - 2)).to(moved.dtype))
    representative = _last_of_each_destination(plan)
    representative_rows = _rows(representative, r)
    sums = torch.zeros_like(term)
    _row_major(sums, B * r).index_add_(0, representative_rows, _row_major(term, B * r))
    # target + sum, added in place into the fresh gather (addition commutes exactly)
    new = sums.view(B * r, *sums.shape[2:]).index_select(0, representative_rows).view(sums.shape)
    new = new.add_(target)
    if mode == "mlerp":
        scale = _largest_norms(plan, both, K) / _feature_norm(new).clamp_min(1e-6)
        scale = scale.view(scale.shape + (1,) * (x.dim() - 2))
        # in place unless autograd needs ``new`` (the norm's backward reads it)
        new = new * scale if new.requires_grad else new.mul_(scale)
    out = _gather_tokens(x, plan.kept)
    _copy_destinations(out, plan, new.to(x.dtype), representative, dst_rows)
    return out


def _largest_norms(plan: MergePlan, both: torch.Tensor, kept: int) -> torch.Tensor:
    """``(B, r)``: for every moved token, the largest feature norm among the tokens its
    destination combines (``both``: :func:`_moved_and_targets`; one reduction over its ``2r``
    rows), mlerp's target norm."""
    norms = _feature_norm(both)
    pair = torch.maximum(norms[:, : plan.r], norms[:, plan.r :])
    largest = norms.new_zeros((norms.shape[0], kept)).scatter_reduce_(1, plan.dst, pair, reduce="amax")
    return largest.gather(1, plan.dst)


def _rescale_destinations(
    plan: MergePlan, out: torch.Tensor, both: torch.Tensor, dst_rows: torch.Tensor
) -> None:
    """mlerp, in place on ``out`` (the group means): every group that received tokens gets the
    largest norm among the tokens it combined (``both``: the moved tokens and their
    destinations' input rows, :func:`_moved_and_targets`). Only the ``r`` destination rows are
    touched: any other group is one token, already its own largest. ``dst_rows``:
    ``_rows(plan.dst, N - r)``."""
    B, K = out.shape[:2]
    rows = out.view(B * K, *out.shape[2:]).index_select(0, dst_rows).view(B, plan.r, *out.shape[2:])
    scale = _largest_norms(plan, both, K) / _feature_norm(rows).clamp_min(1e-6)
    scale = scale.view(scale.shape + (1,) * (out.dim() - 2))
    rows = rows * scale if rows.requires_grad else rows.mul_(scale)
    _copy_destinations(out, plan, rows, None, dst_rows)


def merge_residuals(
    plan: MergePlan, x: torch.Tensor, merged: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a merge step took from every token: ``x[i] - merged[plan.index[i]]``, sparse.

    Only the moved tokens and their destinations change (every other token is its own group's
    value), so this returns ``(rows, residuals)``: ``(B, 2r)`` token indices into ``x`` and
    their ``(B, 2r, ...)`` residuals. A destination that received several tokens appears
    several times, always with the same residual.

    >>> x = torch.randn(2, 9, 4)
    >>> from tome.core.matching import bipartite_soft_matching
    >>> plan = bipartite_soft_matching(torch.randn(2, 9, 4), 3)
    >>> merged = merge(plan, x)
    >>> rows, residuals = merge_residuals(plan, x, merged)
    >>> dense = x - unmerge(plan.index, merged)
    >>> torch.allclose(add_rows(torch.zeros_like(x), rows, residuals), dense)
    True
    """
    rows = torch.cat([plan.src, plan.kept.gather(1, plan.dst)], dim=1)
    groups = torch.cat([plan.dst, plan.dst], dim=1)
    return rows, _gather_tokens(x, rows) - _gather_tokens(merged, groups)


def add_rows(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``x[b, rows[b, k]] += values[b, k]``, in place on ``x`` (contiguous ``(B, N, ...)``);
    returns ``x``. A row repeated within a sample must come with the same value each time
    (it is added once), as :func:`merge_residuals` gives."""
    B, N = x.shape[:2]
    flat = x.view(B * N, *x.shape[2:])
    index = _rows(rows, N)
    return flat.index_copy_(0, index, flat.index_select(0, index) + values.flatten(0, 1)).view(x.shape)


def advance(history: MergeHistory, plan: MergePlan) -> MergeHistory:
    """The history after ``plan``: compose the source map by one gather (O(B·N0))."""
    if plan.r == 0:
        return history
    return MergeHistory(plan.index.gather(1, history.source), plan.sizes)


def unmerge(source: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Give every original token the value of the token that holds it: ``(B, N, ...)`` ->
    ``(B, N0, ...)`` through a gather with the composed ``source`` map."""
    return _gather_tokens(x, source)


def merge_original(history: MergeHistory, x: torch.Tensor) -> torch.Tensor:
    """Average a per-original-token tensor ``(B, N0, ...)`` over the current groups:
    ``(B, N, ...)``. E.g. the mean pixel colour of every group, for pictures."""
    work = x.to(_reduce_dtype(x)) if x.is_floating_point() else x.float()
    B, N = history.sizes.shape
    out = work.new_zeros((B, N, *x.shape[2:]))
    out = out.scatter_add(1, _expand_index(history.source, work), work)
    sizes = history.sizes.to(work.dtype).view(history.sizes.shape + (1,) * (x.dim() - 2))
    out = out / sizes
    return out.to(x.dtype) if x.is_floating_point() else out


def dense_adjacency(
    source: torch.Tensor, num_tokens: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(B, num_tokens, N0)`` 0/1 matrix from a ``(B, N0)`` source map."""
    B, N0 = source.shape
    out = torch.zeros(B, num_tokens, N0, dtype=dtype, device=source.device)
    return out.scatter_(1, source.unsqueeze(1), 1)


def attention_bias(sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention (ToMe): ``log(size)`` of every key token, as a float attention
    mask of shape ``(B, 1, 1, N)`` for ``scaled_dot_product_attention``: a token that holds
    ``s`` originals gets the attention weight of ``s`` copies."""
    return sizes.log().to(dtype)[:, None, None, :]


# The matching lives in tome.core.matching (it imports this module's plan types); its names
# stay reachable here, as they were before the split (``tome.core.merge.bipartite_soft_matching``).
_MATCHING = frozenset(
    {
        "best_edges",
        "bipartite_soft_matching",
        "masked_soft_matching",
        "outlier_bias",
        "per_row_r",
        "unit_features",
        "_all_finite_on_cpu",
        "_match",
        "_normalize",
        "_plan_from_sources",
        "_scores",
        "_sort_descending",
        "_split_ab",
        "_strongest_edges",
        "_top_indices",
    }
)


def __getattr__(name: str):
    if name in _MATCHING:
        from tome.core import matching

        value = globals()[name] = getattr(matching, name)  # found once: merges call it every layer
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
