"""Matching: which tokens merge into which (bipartite soft matching, Bolya et al., "Token
Merging: Your ViT But Faster", ICLR 2023). Split the tokens alternately into sets A and B, draw
from every A token an edge to its most similar B token (cosine similarity of ``metric``), and
merge the ``r`` A tokens with the strongest edges into their B partners. The result is a
:class:`~tome.core.merge.MergePlan`; :mod:`tome.core.merge` carries it out (merging, unmerging,
source maps).

Free of host-device synchronisation and data-dependent shapes where it matters (compiled, on an
accelerator); eager on the CPU, two shortcuts read a value back (a finiteness check, a ``topk``
whose order is unique).

>>> import torch
>>> from tome.core.matching import bipartite_soft_matching
>>> plan = bipartite_soft_matching(torch.randn(2, 9, 4), r=3, protected=1)
>>> plan.kept.shape, plan.src.shape
(torch.Size([2, 6]), torch.Size([2, 3]))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from tome.core.merge import MergeHistory, MergePlan, _as, _l2, _rows

__all__ = [
    "best_edges",
    "bipartite_soft_matching",
    "masked_soft_matching",
    "outlier_bias",
    "per_row_r",
    "unit_features",
]

# Score given to a pair of padding tokens (ids == mask_id): above any cosine similarity (<= 1),
# so padding merges with padding before anything else merges.
_PAD_SCORE = 2.0


def _normalize(metric: torch.Tensor) -> torch.Tensor:
    # A token whose key has a NaN/inf entry would poison every score it touches: its whole key
    # counts as 0 instead (its norm is not finite, so the division gives NaN/0 entries, zeroed in
    # place; an out-of-place nan_to_num of the full keys was much slower on CPU). A zero vector
    # has cosine similarity 0 with every token (clamped norm), so it merges only when nothing
    # is more similar, and never produces NaN. Similarities are computed in float32: half
    # precision would round close scores into ties.
    converted = metric.dtype != torch.float32
    metric = _as(metric, torch.float32)
    if metric.requires_grad:
        # Same rule, with finite gradients (scores from best_edges may be backpropagated): a
        # non-finite key is replaced by zeros before any arithmetic touches it.
        finite = torch.isfinite(_l2(metric.detach(), keepdim=True))
        metric = torch.where(finite, metric, 0.0)
        return metric / _l2(metric, keepdim=True).clamp_min(1e-6)
    norm = _l2(metric, keepdim=True)
    # A float32 copy made just above is divided in place (one allocation fewer).
    unit = metric.div_(norm.clamp_min(1e-6)) if converted else metric / norm.clamp_min(1e-6)
    # A finite norm means finite entries (and a finite quotient): the clean-up pass is needed
    # only if some norm is not. Eager CPU checks that (one small read, no sync on CPU) and so
    # skips a full pass over the keys, one parallel region fewer (they stall on a busy
    # machine); compiled or on an accelerator it always runs (no host read-back). Norms are
    # >= 0, so their sum is finite if they all are (a sum that overflows only costs the
    # clean-up pass, which changes nothing then): one reduction instead of a mask and ``all``.
    if _all_finite_on_cpu(norm.sum()):
        return unit
    return unit.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _all_finite_on_cpu(total: torch.Tensor) -> bool:
    """Whether the 0-d CPU tensor ``total`` is finite, read eagerly; ``False`` when it cannot
    be read without a host sync or at all (compiling, an accelerator, the fake tensors of FLOP
    counting, which have no values). One read of the value, checked in Python: an
    ``isfinite(...).all()`` on the tensor is several more small ops."""
    if total.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    try:
        return math.isfinite(total.item())
    except RuntimeError:  # a fake tensor: data-dependent output
        return False


def _holds(condition: torch.Tensor) -> bool:
    """The value of a 0-d bool CPU tensor; ``False`` for the fake tensors of FLOP counting,
    which have no values."""
    try:
        return bool(condition)
    except RuntimeError:  # a fake tensor: data-dependent output
        return False


def unit_features(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """One unit-norm similarity feature per token from several ``(B, N, D_i)`` parts: each part
    normalized on its own and scaled by ``sqrt(weight)``, concatenated (``weights`` sum to 1).
    The cosine similarity of the result is the weighted sum of the parts' cosines; a part with
    a NaN/inf entry counts as all zero (as in matching). Float32, no gradient, one allocation:
    pass it to the matching functions with ``normalized=True``.

    >>> import torch.nn.functional as F
    >>> keys, hidden = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
    >>> f = unit_features([keys, hidden], [0.5, 0.5])
    >>> f.shape, torch.allclose(f.norm(dim=-1), torch.ones(2, 5))
    (torch.Size([2, 5, 12]), True)
    >>> cos = lambda t: F.normalize(t, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2)
    >>> torch.allclose(f @ f.transpose(1, 2), 0.5 * cos(keys) + 0.5 * cos(hidden), atol=1e-6)
    True
    """
    if len(parts) != len(weights) or not parts:
        raise ValueError(
            f"unit_features: expected as many weights as parts, got {len(weights)} and {len(parts)}"
        )
    with torch.no_grad():
        parts = [p.detach().float() for p in parts]
        scales = [
            math.sqrt(w) / _l2(p, keepdim=True).clamp_min(1e-6) for p, w in zip(parts, weights, strict=True)
        ]
        if torch.compiler.is_compiling():  # compilers fuse this; `out=` slices do not trace
            out = torch.cat([p * s for p, s in zip(parts, scales, strict=True)], dim=-1)
        else:
            # Eager: written in place into one buffer (fresh large blocks are slow on CPU: every
            # page is faulted in on first touch).
            shape = (*parts[0].shape[:-1], sum(p.shape[-1] for p in parts))
            out = torch.empty(shape, dtype=torch.float32, device=parts[0].device)
            start = 0
            for part, scale in zip(parts, scales, strict=True):
                torch.mul(part, scale, out=out[..., start : start + part.shape[-1]])
                start += part.shape[-1]
        return out.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _split_ab(
    metric: torch.Tensor, protected: int, sequence_ids: torch.Tensor | None, normalized: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Normalized keys of sets A (even unprotected tokens) and B (odd), and their ids.
    ``normalized``: the metric is unit-norm already (:func:`unit_features`): strided views, no copy."""
    metric = metric[:, protected:] if normalized else _normalize(metric[:, protected:])
    if sequence_ids is None:
        return metric[:, ::2], metric[:, 1::2], None, None
    ids = sequence_ids[:, protected:]
    return metric[:, ::2], metric[:, 1::2], ids[:, ::2], ids[:, 1::2]


def _scores(
    a: torch.Tensor, b: torch.Tensor, ids_a: torch.Tensor | None, ids_b: torch.Tensor | None, mask_id: int
) -> torch.Tensor:
    """Cosine similarities A x B, ``(B, |A|, |B|)``: ``-inf`` between different sequence ids,
    ``2`` between two padding tokens. Always float32, autocast or not (bfloat16 scores would
    round the best edges of many tokens into ties)."""
    if torch.is_autocast_enabled(a.device.type):
        with torch.autocast(a.device.type, enabled=False):
            scores = a @ b.transpose(-1, -2)
    else:
        scores = a @ b.transpose(-1, -2)
    if ids_a is not None:
        ids_a, ids_b = ids_a[:, :, None], ids_b[:, None, :]
        scores.masked_fill_((ids_a == mask_id) & (ids_b == mask_id), _PAD_SCORE)
        scores.masked_fill_(ids_a != ids_b, float("-inf"))
    return scores


def best_edges(
    metric: torch.Tensor,
    protected: int = 0,
    sequence_ids: torch.Tensor | None = None,
    mask_id: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each A token's best edge into set B: ``(score, b_index)``, both ``(B, |A|)``.

    Scores are cosine similarities; ``-inf`` where an A token has no B token with the same
    sequence id; ``2`` for pairs of padding tokens. Ties resolve to the lowest B index.
    """
    scores = _scores(*_split_ab(metric, protected, sequence_ids), mask_id)
    # argmax returns the first maximum: ties resolve to the lowest B index, deterministically.
    return scores.amax(dim=-1), scores.argmax(dim=-1)


def _sort_descending(values: torch.Tensor) -> torch.return_types.sort:
    """Sort the last dim, largest first; equal values in index order (deterministic merges).

    ONNX has no stable sort, but its TopK, which a plain sort exports to, breaks ties by index
    (the ONNX spec): exported graphs use the plain sort and keep the same order."""
    if torch.compiler.is_exporting():
        return torch.sort(values, dim=-1, descending=True)
    return torch.sort(values, dim=-1, descending=True, stable=True)


# Up to this many values (all rows) a stable sort ranks them as fast as topk and its check
# (timed right after a large matrix product: ``python experiments/merge_step_cold.py --thresholds``).
_SORT_AT_MOST = 2048


def _top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """``_sort_descending(values).indices[:, :k]`` for a 2-d ``values``, cheaper where it can.

    Eager on CPU, ``topk`` of ``k + 1`` (~2x faster than the stable sort at 128 values) gives
    the same indices whenever its values are strictly decreasing: then the ``k`` largest are
    unique and so is their order (a tie, a NaN or an infinity repeated makes a comparison
    false, and the stable sort runs instead). Compiled, exported or on an accelerator (that
    check reads a value back), traced, or on fake tensors (no values): the stable sort. So
    for at most :data:`_SORT_AT_MOST` values: the sort is as fast, and one op where the
    check takes four."""
    n = values.shape[-1]
    if 0 < k < n and values.device.type == "cpu" and _eager() and values.numel() > _SORT_AT_MOST:
        top = torch.topk(values, k + 1, dim=-1)
        if _holds((top.values[:, :-1] > top.values[:, 1:]).all()):
            return top.indices[:, :k]
    return _sort_descending(values).indices[:, :k]


# On CPU, score blocks are kept below this size: glibc hands out larger blocks as fresh pages
# from the kernel on every call, and faulting them in costs more than the matrix product itself
# (measured: 60 MB of scores at 1370 tokens, batch 32). Smaller blocks are reused.
_CPU_SCORE_BLOCK_BYTES = 16 * 2**20
# Up to this many scores, the best partner of every A token is found in the same pass as its
# best score; above it, only for the r chosen tokens. After a large matrix product (the model's
# own), the one pass was faster up to ViT-S at 224 px, batch 32 (128 x 127 scores per image) and
# slower at 518 px, batch 4 (685 x 685): ``python experiments/merge_step_cold.py --thresholds``.
_ONE_PASS_SCORES = 2**19


def _strongest_edges(
    a: torch.Tensor,
    b: torch.Tensor,
    ids_a: torch.Tensor | None,
    ids_b: torch.Tensor | None,
    mask_id: int,
    r: int,
    bias: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``r`` strongest A->B edges of every sample: ``(a_index, b_index)``, both ``(B, r)``.

    The same edges as ranking :func:`best_edges` (stable sort: equal scores in token order).
    Up to :data:`_ONE_PASS_SCORES` scores, every A token's best score and partner come from one
    ``max`` pass; above it, the ranking reads the best scores alone (``amax``, a fast
    reduction) and the partner is found only for the ``r`` chosen A tokens. ``bias``: optional
    ``(B, |A|)`` and ``(B, |B|)`` terms added to the scores of every A row and B column.
    """
    scores = _scores(a, b, ids_a, ids_b, mask_id)
    if bias is not None:
        scores = scores + bias[0][:, :, None] + bias[1][:, None, :]
    # max(dim) returns argmax's index (the first maximum, a NaN counting as the maximum:
    # documented, tested) at under half argmax's cost on CPU.
    if scores.numel() <= _ONE_PASS_SCORES:
        # Small: best scores and partners in one pass (fewer ops: after the model's large
        # matrix products each op kind costs tens of microseconds to bring back into cache).
        best, partner = scores.max(dim=-1)
        a_index = _top_indices(best, r)
        return a_index, partner.gather(1, a_index)
    a_index = _top_indices(scores.amax(dim=-1), r)
    # Large: ranking needs the best scores only (amax, a fast reduction); the partners of the
    # chosen rows by one index_select of whole rows (gather with an index expanded over |B|
    # builds a (B, r, |B|) int64 index: ~8x slower on CPU).
    batch, rows, cols = scores.shape
    chosen = scores.reshape(batch * rows, cols).index_select(0, _rows(a_index, rows))
    return a_index, chosen.max(dim=-1).indices.view(batch, r)


def _match(
    metric: torch.Tensor,
    r: int,
    protected: int,
    sequence_ids: torch.Tensor | None,
    mask_id: int,
    token_bias: torch.Tensor | None = None,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    a, b, ids_a, ids_b = _split_ab(metric, protected, sequence_ids, normalized)
    bias = None
    if token_bias is not None:
        token_bias = token_bias[:, protected:].float()
        bias = (token_bias[:, ::2], token_bias[:, 1::2])
    return _edges_in_blocks(a, b, r, ids_a, ids_b, mask_id, bias)


def _edges_in_blocks(
    a: torch.Tensor,
    b: torch.Tensor,
    r: int,
    ids_a: torch.Tensor | None = None,
    ids_b: torch.Tensor | None = None,
    mask_id: int = -100,
    bias: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_strongest_edges` of unit features ``a`` (B, |A|, D) and ``b`` (B, |B|, D), on CPU
    a few samples at a time so that the score blocks stay below :data:`_CPU_SCORE_BLOCK_BYTES`
    (samples are independent: exactly the same result)."""
    batch, block = a.shape[0], a.shape[0]
    if a.device.type == "cpu":
        block = max(1, _CPU_SCORE_BLOCK_BYTES // max(1, 4 * a.shape[1] * b.shape[1]))
    if block >= batch:
        return _strongest_edges(a, b, ids_a, ids_b, mask_id, r, bias)
    parts = [
        _strongest_edges(
            a[i : i + block],
            b[i : i + block],
            None if ids_a is None else ids_a[i : i + block],
            None if ids_b is None else ids_b[i : i + block],
            mask_id,
            r,
            None if bias is None else (bias[0][i : i + block], bias[1][i : i + block]),
        )
        for i in range(0, batch, block)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    history: MergeHistory | None = None,
    protected: int = 0,
    sequence_ids: torch.Tensor | None = None,
    mask_id: int = -100,
    token_bias: torch.Tensor | None = None,
    normalized: bool = False,
) -> MergePlan:
    """Plan the merge of the ``r`` most similar tokens (no argument checking: see TokenMerger).

    Args:
        metric: ``(B, N, D)`` similarity features (e.g. attention keys averaged over heads).
        r: tokens to remove, ``0 <= r <= max_r(N, protected)``.
        history: sizes of the current tokens; ``None`` means all 1.
        protected: the first ``protected`` tokens are never merged.
        sequence_ids: ``(B, N)`` integer ids; tokens with different ids never merge.
        mask_id: id of padding tokens, which merge with each other first.
        token_bias: optional ``(B, N)`` float term added to the score of every edge that
            touches a token (e.g. ``-4`` keeps a token out of every merge unless nothing else
            is left; see :func:`outlier_bias`). ``None``: plain ToMe.
        normalized: ``metric`` is unit-norm per token already (:func:`unit_features`), so it
            is not normalized again.

    Returns:
        The :class:`MergePlan`. Matching carries no gradient.

    >>> plan = bipartite_soft_matching(torch.randn(2, 9, 4), r=3, protected=1)
    >>> plan.kept.shape, plan.index[:, 0].tolist()
    (torch.Size([2, 6]), [0, 0])
    """
    B, N = metric.shape[:2]
    device = metric.device
    in_sizes = history.sizes if history is not None else torch.ones(B, N, device=device)
    if r == 0:
        index = torch.arange(N, device=device).expand(B, N)
        empty = torch.empty(B, 0, dtype=torch.long, device=device)
        return MergePlan(index, index, empty, empty, in_sizes, in_sizes)

    # (entered only where gradients are on: the context costs microseconds on every step)
    with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
        # Stable ranking: equal scores merge in token order, so merges are deterministic.
        src_local, dst_local = _match(metric, r, protected, sequence_ids, mask_id, token_bias, normalized)
        src = src_local * 2 + protected
        dst_in = dst_local * 2 + (protected + 1)
        return _plan_from_sources(src, dst_in, in_sizes, N, r)


def _plan_from_sources(
    src: torch.Tensor, dst_in: torch.Tensor, in_sizes: torch.Tensor, N: int, r: int
) -> MergePlan:
    """The :class:`MergePlan` that merges input tokens ``src`` (B, r) into input tokens
    ``dst_in`` (B, r) (which must be kept); the surviving tokens keep their order."""
    B, device = src.shape[0], src.device
    keep = torch.ones(B, N, dtype=torch.bool, device=device)
    keep.scatter_(1, src, False)
    position = keep.cumsum(1).sub_(1)  # merged position of every kept token, order preserved
    dst = position.gather(1, dst_in)
    if device.type == "cpu" and _eager():
        # kept = the kept tokens in order: a stable sort puts them first. One op where the
        # scatter below takes four (each op kind costs tens of microseconds after the model's
        # large matrix products have pushed it out of cache).
        kept = keep.sort(dim=1, descending=True, stable=True).indices[:, : N - r]
    else:
        # kept[:, p] = the kept token at merged position p. Merged-away tokens write to a spare
        # slot at the end, which is cut off: no boolean indexing, no data-dependent shape, no
        # stable sort (ONNX has none).
        slot = torch.where(keep, position, N - r)
        arange = torch.arange(N, device=device).expand(B, N)
        kept = torch.empty(B, N - r + 1, dtype=torch.long, device=device)
        kept = kept.scatter_(1, slot, arange)[:, : N - r]
    index = position.scatter_(1, src, dst)  # in place: every tensor here is fresh
    sizes = in_sizes.gather(1, kept).scatter_add_(1, dst, in_sizes.gather(1, src))
    return MergePlan(index, kept, src, dst, sizes, in_sizes)


def _eager() -> bool:
    """Running eagerly: not compiling, exporting or tracing (those keep the export-safe ops)."""
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing())


def per_row_r(valid_tokens: torch.Tensor, protected: int, r: int | None, ratio: float | None) -> torch.Tensor:
    """``(B,)`` int64: tokens each row removes, from its own count of real tokens
    ``valid_tokens`` (B,): ``ratio`` of its mergeable tokens, or ``r``; never more than half
    of them (ToMe's cap). A row's count depends on that row alone.

    >>> per_row_r(torch.tensor([3, 10, 41]), protected=1, r=None, ratio=0.25).tolist()
    [0, 2, 10]
    >>> per_row_r(torch.tensor([3, 10, 41]), protected=1, r=8, ratio=None).tolist()
    [1, 4, 8]
    """
    mergeable = (valid_tokens - protected).clamp_min(0)
    if ratio is not None:
        wanted = torch.floor(mergeable.double() * ratio + 1e-9).long()
    else:
        wanted = torch.full_like(mergeable, int(r))
    return torch.minimum(wanted, mergeable // 2)


def masked_soft_matching(
    metric: torch.Tensor,
    r: int,
    row_r: torch.Tensor,
    history: MergeHistory,
    protected: int = 0,
    sequence_ids: torch.Tensor | None = None,
    token_bias: torch.Tensor | None = None,
    normalized: bool = False,
) -> MergePlan:
    """Bipartite soft matching for padded (and packed) batches, decided row by row.

    Padding tokens are those of size 0 in ``history`` (a padded batch starts with sizes 0 at
    its padding). Every row removes ``r`` tokens (the same for all rows: shapes stay static),
    of which exactly ``row_r[b]`` (``<= r``) are merges of its real tokens, chosen by ToMe's rule
    on its own similarities; the rest are padding tokens folded into the row's last kept
    token (size 0: they change nothing). So a row merges the same real tokens alone or in any
    right-padded batch. ``r - row_r[b]`` must not exceed the row's padding (it never does for
    ``r``, ``row_r`` from :func:`per_row_r` on the longest possible row and on this row).

    Args:
        metric: ``(B, N, D)`` similarity features.
        r: tokens every row removes.
        row_r: ``(B,)`` merges of real tokens per row.
        history: sizes (0 at padding) of the current tokens.
        protected: the first ``protected`` tokens are never merged.
        sequence_ids: optional ``(B, N)`` document ids of packed rows: real tokens merge only
            within their document.
        token_bias: as in :func:`bipartite_soft_matching`.
        normalized: ``metric`` is unit-norm per token already (:func:`unit_features`), so it
            is not normalized again.

    >>> sizes = torch.tensor([[1.0, 1, 1, 1, 1, 1, 0, 0, 0]])  # 6 real tokens, 3 padding
    >>> h = MergeHistory(torch.arange(9)[None], sizes)
    >>> plan = masked_soft_matching(torch.randn(1, 9, 4), 3, torch.tensor([2]), h, protected=1)
    >>> # 2 real merges and 1 padding token removed: 4 real tokens (holding all 6), then 2 padding
    >>> plan.sizes.shape[1], (plan.sizes[0, :4] > 0).all().item(), plan.sizes[0, 4:].tolist()
    (6, True, [0.0, 0.0])
    >>> plan.sizes.sum().item()
    6.0
    """
    B, N = metric.shape[:2]
    device = metric.device
    in_sizes = history.sizes
    if r == 0:
        index = torch.arange(N, device=device).expand(B, N)
        empty = torch.empty(B, 0, dtype=torch.long, device=device)
        return MergePlan(index, index, empty, empty, in_sizes, in_sizes)
    with torch.no_grad():
        valid = in_sizes > 0
        ids = (
            torch.zeros(B, N, dtype=torch.long, device=device)
            if sequence_ids is None
            else sequence_ids.long()
        )
        ids = torch.where(valid, ids, -1)  # a real token never pairs with padding
        a, b, ids_a, ids_b = _split_ab(metric, protected, ids, normalized)
        scores = _scores(a, b, ids_a, ids_b, mask_id=-2)  # -2: no id means "padding pairs first"
        scores.masked_fill_((ids_a < 0)[:, :, None], float("-inf"))
        if token_bias is not None:
            bias = token_bias[:, protected:].float()
            scores = scores + bias[:, ::2, None] + bias[:, None, 1::2]
        best, partner = scores.amax(dim=-1), scores.argmax(dim=-1)
        # Rank every row's A tokens by their best edge; its row_r strongest real ones merge.
        rank = _sort_descending(best).indices.argsort(dim=-1)
        merge_real = (ids_a >= 0) & (rank < row_r[:, None]) & torch.isfinite(best)
        # Padding to remove: the first (r - row_r) padding tokens of the row.
        padding = ~valid
        padding[:, :protected] = False
        pad_rank = padding.long().cumsum(1) - 1
        remove_pad = padding & (pad_rank < (r - row_r)[:, None])
        # The r removed tokens, by a per-token key: real merges 2, padding to remove 1, other
        # padding 0.5 (only if a packed row has too few pairs within its documents), real 0,
        # protected -1 (never).
        key = torch.where(remove_pad, 1.0, torch.where(padding, 0.5, 0.0))
        key[:, protected::2] = torch.where(merge_real, 2.0, key[:, protected::2])
        key[:, :protected] = -1.0
        src = _sort_descending(key).indices[:, :r]
        # Destinations: a real token's best B partner; padding: the last kept token.
        keep = torch.ones(B, N, dtype=torch.bool, device=device)
        keep.scatter_(1, src, False)
        last_kept = (torch.arange(N, device=device) * keep).amax(dim=1, keepdim=True)
        a_local = ((src - protected) // 2).clamp(0, partner.shape[1] - 1)
        b_position = protected + 1 + 2 * partner.gather(1, a_local)
        is_real = key.gather(1, src) == 2
        dst_in = torch.where(is_real, b_position, last_kept.expand(B, r))
        return _plan_from_sources(src, dst_in, in_sizes, N, r)


def outlier_bias(x: torch.Tensor, k: int, protected: int = 0) -> torch.Tensor:
    """``(B, N)`` token bias for :func:`bipartite_soft_matching` that keeps the ``k``
    unprotected tokens of largest feature norm out of the merge (``-4``, below any cosine
    similarity: they still merge where ``r`` needs more tokens than the others give). ViTs
    trained without registers store global information in a few high-norm tokens (Darcet et
    al., "Vision Transformers Need Registers", ICLR 2024)."""
    B, N = x.shape[:2]
    with torch.no_grad():
        norms = _l2(x[:, protected:].detach().float().flatten(2))
        k = min(k, N - protected)
        rank = _sort_descending(norms).indices.argsort(dim=-1)
        bias = torch.where(rank < k, -4.0, 0.0).to(torch.float32)
        if protected:
            bias = torch.cat([bias.new_zeros(B, protected), bias], dim=1)
    return bias
