"""Rotary positions (RoPE) of merged tokens: the handle of models with rotary positions
(:class:`RopeHandle`: timm ``Eva``, ``NaFlexVit`` with RoPE) and the embedding a merged token
rotates by (:func:`merged_rope`). Why the size-weighted mean of the patches' ``sin`` and
``cos``: :mod:`tome.adapters.timm_eva`."""

from __future__ import annotations

import torch

from tome.core.merge import MergeHistory
from tome.runtime.handle import BlockCall, ToMeHandle
from tome.runtime.options import Option, one_of

__all__ = ["DEFAULT_ROPE_MERGE", "ROPE_MERGES", "RopeHandle", "block_rope", "merged_rope"]

ROPE_MERGES = ("mean", "normalized", "first")
DEFAULT_ROPE_MERGE = "mean"


class RopeHandle(ToMeHandle):
    """The handle of a model with rotary positions (timm ``Eva``, ``NaFlexVit`` with RoPE):
    :class:`ToMeHandle` plus how a merged token rotates."""

    rope_merge = Option(
        DEFAULT_ROPE_MERGE,
        one_of(*ROPE_MERGES),
        "how a merged token rotates: the size-weighted mean of its patches' sin/cos ('mean'), "
        "renormalized ('normalized'), or its first patch's ('first')",
    )


def merged_rope(
    rope: torch.Tensor,
    history: MergeHistory,
    protected: int,
    how: str = DEFAULT_ROPE_MERGE,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rotary embedding of the current (merged) patch tokens, ``(B, heads or 1, N - p, 2d)``,
    from the model's embedding of the original ones: ``(N0 - p, 2d)`` (axial), ``(heads,
    N0 - p, 2d)`` (mixed, per depth) or either with a leading batch dimension (patch dropout,
    NaFlex). ``p`` = ``protected`` prefix tokens (never rotated, never merged); ``valid``:
    ``(B, N0)`` bool, False at padding (weight 0); ``how``: one of :data:`ROPE_MERGES`.

    >>> angle = torch.tensor([0.0, 0.5, 1.0, 1.5])[:, None]  # 4 patches, one frequency
    >>> rope = torch.cat([angle.sin(), angle.cos()], -1)
    >>> h = MergeHistory(torch.tensor([[0, 1, 1, 2, 2]]), torch.tensor([[1.0, 2, 2]]))
    >>> merged_rope(rope, h, protected=1).shape  # (B, 1, merged patches, sin | cos)
    torch.Size([1, 1, 2, 2])
    >>> merged_rope(rope, h, protected=1, how="first")[0, 0, 1].tolist() == rope[2].tolist()
    True
    """
    source = history.source[:, protected:] - protected  # original patch -> current patch
    B, n0 = source.shape
    n = history.sizes.shape[1] - protected
    emb = rope.reshape((1,) * (4 - rope.dim()) + tuple(rope.shape)) if rope.dim() < 4 else rope
    if rope.dim() > 4 or emb.shape[-2] != n0:
        raise ValueError(
            f"rope: expected the rotary embedding of the {n0} original patch tokens, (..., {n0}, 2 * "
            f"head_dim), got shape {tuple(rope.shape)}"
        )
    emb = emb.expand(B, -1, -1, -1)
    heads, dim = emb.shape[1], emb.shape[-1]
    if how == "first":
        order = torch.arange(n0, device=source.device).expand(B, n0)
        first = torch.full((B, n), n0 - 1, dtype=source.dtype, device=source.device)
        first = first.scatter_reduce(1, source, order, "amin")
        return emb.gather(2, first[:, None, :, None].expand(B, heads, n, dim))
    # The size-weighted mean of each group's sin and cos (padding: weight 0).
    work = emb.to(torch.float32)
    if valid is not None:
        work = work * valid[:, None, protected:, None]
    index = source[:, None, :, None].expand(B, heads, n0, dim)
    total = work.new_zeros(B, heads, n, dim).scatter_add_(2, index, work)
    mean = total / history.sizes[:, None, protected:, None].clamp_min(1e-6)
    if how == "normalized":  # unit length per frequency: the circular mean of the angles
        sin, cos = mean.chunk(2, dim=-1)
        norm = torch.sqrt(sin * sin + cos * cos).clamp_min(1e-6)
        mean = torch.cat([sin / norm, cos / norm], dim=-1)
    return mean.to(rope.dtype)


def block_rope(handle: ToMeHandle, call: BlockCall, rope: torch.Tensor | None) -> torch.Tensor | None:
    """The rope a block call runs with: the model's own until something merged, then
    :func:`merged_rope` by ``handle.rope_merge``."""
    if rope is None or not call.merged:
        return rope
    how = getattr(handle, "rope_merge", DEFAULT_ROPE_MERGE)
    return merged_rope(rope, call.history, handle.protected, how, call.pass_state.key_valid)
