"""timm ``Eva`` (EVA-02, EVA-CLIP, Perception Encoder, DINOv3, timm's ``vit_*_rope*``): merge
between attention and MLP in every ``EvaBlock`` / ``EvaBlockPostNorm``, with rotary positions
carried to the merged tokens.

Each block is re-composed from its own submodules (norms, attention, ``gamma_1``/``gamma_2``
LayerScale, drop-path, MLP), as :mod:`tome.adapters.timm_vit` does for ``VisionTransformer``: the
attention module keeps its own fused/unfused path and rotary code; proportional attention goes
in as its float ``attn_mask``. Keys (the matching metric) are read from ``attn.k_norm`` (before
the rotation: the similarity of the content, not of the positions) by a forward hook.

Rotary positions. RoPE rotates each query and key by its token's position, so attention logits
depend on relative positions. A merged token holds several positions; the model's ``rope``
tensor (``sin | cos`` per patch, given to every block) is replaced, for the merged tokens, by
the size-weighted mean of its original patches' ``sin`` and ``cos`` (``rope_merge="mean"``,
the default). Rotations act linearly on ``q`` and ``k``, so a merged key with this embedding
gives every query the size-weighted *mean of the logits* its original keys would have had
for the same content (and a merged query likewise): it is the rotary counterpart of ToMe's
averaging of the tokens themselves. Where a group's angles disagree (high frequencies over
distant patches) the averaged rotation shrinks, and that frequency stops pretending to a
position the group does not have. Alternatives, settable as ``model.tome.rope_merge``:
``"normalized"`` (the same mean, rescaled to unit length per frequency: the circular mean of
the angles) and ``"first"`` (the position of the group's first original patch).
``benchmarks/rope_merge.py`` measures them against plain averaging of the positions.

Every installed function is module-level and gets its block index and the handle as bound
arguments, so a patched model pickles and deep-copies.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters import timm_vit as _timm
from tome.adapters.common.timm import VISION
from tome.core.merge import MergeHistory
from tome.runtime.handle import BlockCall, ToMeHandle
from tome.runtime.options import Option, one_of
from tome.runtime.registry import CARRY, Adapter

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


# block class -> its parts (pre-norm EVA-02 block; post-norm block of EVA-02-E)
_BLOCK_PARTS = {
    "EvaBlock": ("norm1", "attn", "gamma_1", "drop_path1", "norm2", "mlp", "gamma_2", "drop_path2"),
    "EvaBlockPostNorm": ("attn", "norm1", "drop_path1", "mlp", "norm2", "drop_path2"),
}
_ATTENTIONS = ("EvaAttention", "AttentionRope")
_ATTN_PARTS = ("k_norm", "num_heads", "num_prefix_tokens")


def check_block(index: int, block: nn.Module, num_prefix_tokens: int, where: str = "timm Eva") -> str:
    """The kind of an Eva block (``"EvaBlock"`` or ``"EvaBlockPostNorm"``), or a clear error
    naming the block and what is supported."""
    kind = type(block).__name__
    parts = _BLOCK_PARTS.get(kind)
    if parts is None or not all(hasattr(block, p) for p in parts):
        raise TypeError(
            f"tome: {where} block {index} is a {kind}; supported: timm.models.eva.EvaBlock and "
            "EvaBlockPostNorm (with their norm1/attn/drop_path1/norm2/mlp/drop_path2 parts)"
        )
    attn = block.attn
    if type(attn).__name__ not in _ATTENTIONS or not all(hasattr(attn, p) for p in _ATTN_PARTS):
        raise TypeError(
            f"tome: {where} block {index} uses attention {type(attn).__name__}; supported: "
            f"timm's {' and '.join(_ATTENTIONS)} (with k_norm, num_heads, num_prefix_tokens)"
        )
    if attn.num_prefix_tokens != num_prefix_tokens:
        raise TypeError(
            f"tome: {where} block {index} rotates all but its first {attn.num_prefix_tokens} tokens, "
            f"but the model has {num_prefix_tokens} prefix tokens; expected them to agree"
        )
    return kind


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


def run_block(
    block: nn.Module,
    kind: str,
    handle: ToMeHandle,
    call: BlockCall,
    x: torch.Tensor,
    rope: torch.Tensor | None,
    bias: torch.Tensor | None,
    is_causal: bool = False,
) -> torch.Tensor:
    """One Eva block re-composed from its parts, merging after the attention residual."""
    handle.take_keys()  # nothing left over from an interrupted call in this thread
    if kind == "EvaBlockPostNorm":
        x = x + block.drop_path1(block.norm1(block.attn(x, rope=rope, attn_mask=bias, is_causal=is_causal)))
        x = handle.merge_layer(call, x, handle.take_keys())
        return handle.end_layer(call, x + block.drop_path2(block.norm2(block.mlp(x))))
    attn_out = block.attn(block.norm1(x), rope=rope, attn_mask=bias, is_causal=is_causal)
    if block.gamma_1 is not None:
        attn_out = block.gamma_1 * attn_out
    x = x + block.drop_path1(attn_out)
    x = handle.merge_layer(call, x, handle.take_keys())
    mlp_out = block.mlp(block.norm2(x))
    if block.gamma_2 is not None:
        mlp_out = block.gamma_2 * mlp_out
    return handle.end_layer(call, x + block.drop_path2(mlp_out))


def _block_forward(
    block: nn.Module,
    index: int,
    handle: ToMeHandle,
    kind: str,
    x: torch.Tensor,
    rope: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    if (attn_mask is not None or is_causal) and handle.schedules_merges(index):
        raise ValueError(
            "tome: a patched timm Eva block cannot merge tokens under a user attn_mask/is_causal; "
            "set model.tome.r = 0 or unpatch the model"
        )
    call = handle.begin_layer(index, x)
    bias = handle.attention_bias(call, x.dtype)
    if attn_mask is not None or is_causal:
        bias = attn_mask
    return run_block(block, kind, handle, call, x, block_rope(handle, call, rope), bias, is_causal)


def forward_intermediates(model: nn.Module, *args, **kwargs):
    """``forward_intermediates`` of a patched model: the model's own while nothing merges; with
    merging, a clear error (its intermediates are reshaped to the patch grid inside timm)."""
    if any(model.tome.schedules_merges(i) for i in range(model.tome.num_layers)):
        raise NotImplementedError(
            f"tome: {type(model).__name__}.forward_intermediates of a merging model is not supported (timm "
            "reshapes the merged tokens to the patch grid); set model.tome.r = 0 for it, or read "
            "forward_features with model.tome.unmerge_output = True"
        )
    return type(model).forward_intermediates(model, *args, **kwargs)


def apply(model: nn.Module, *, r, **settings) -> ToMeHandle:
    blocks = list(model.blocks)
    kinds = [check_block(i, block, model.num_prefix_tokens) for i, block in enumerate(blocks)]
    if not hasattr(type(model), "pool"):
        raise TypeError("tome: this timm version's Eva has no pool(); please upgrade timm")
    handle = RopeHandle(len(blocks), r, protected=model.num_prefix_tokens, **settings)
    with handle.installing():
        for index, (block, kind) in enumerate(zip(blocks, kinds, strict=True)):
            handle.install_hook(block.attn.k_norm, _timm._key_hook, index, handle)
            handle.install_method(block, "forward", _block_forward, index, handle, kind)
        handle.install_hook(model.norm, _timm._norm_hook, handle)
        handle.install_method(model, "forward_features", _timm._forward_features)
        handle.install_method(model, "pool", _timm._pool)
        if hasattr(type(model), "forward_intermediates"):
            handle.install_method(model, "forward_intermediates", forward_intermediates)
    return handle


ADAPTER = Adapter(
    library="timm",
    classes=("Eva",),
    kind=CARRY,
    title="timm vision transformers with rotary positions (Eva, NaFlexVit)",
    apply=apply,
    handle=RopeHandle,
    merged="between attention and MLP in every `EvaBlock` / `EvaBlockPostNorm`; merged tokens rotate (RoPE) by "
    "the size-weighted mean of their patches' sin/cos; pooling size-weighted",
    tested_on="tiny random configs (EVA-02, vit_*_rope*, mixed RoPE, DINOv3 with registers, PE attention "
    "pooling, post-norm)",
    vision=VISION,
)
