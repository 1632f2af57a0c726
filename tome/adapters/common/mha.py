"""``nn.MultiheadAttention`` as the adapters use it: checked once, then run through SDPA.

torchvision's ``EncoderBlock`` and open_clip's ``ResidualAttentionBlock`` both hold a stock
``nn.MultiheadAttention``. Its own forward cannot return the keys (the merge metric) and takes a
boolean or additive mask only in its own layout, so the adapters run its packed ``in_proj`` and
``out_proj`` themselves and hand proportional attention to ``scaled_dot_product_attention`` as its
float mask: the fused kernel is kept.

Example:
    >>> import torch
    >>> from tome.adapters.common.mha import check_fused, self_attention
    >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    >>> check_fused(mha, where="my block 0")
    >>> out, keys = self_attention(mha, torch.randn(1, 5, 8), None)
    >>> out.shape, keys.shape
    (torch.Size([1, 5, 8]), torch.Size([1, 5, 2, 4]))
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tome.adapters.common.kernel import is_key_bias
from tome.core.attention import key_bias_attention


def check_fused(mha: nn.Module, *, where: str, batch_first: bool = True) -> None:
    """Raise a ``TypeError`` naming ``where`` unless ``mha`` is an attention ``self_attention`` runs.

    ``batch_first=False`` skips the layout check, for callers that transpose themselves.
    """
    if not isinstance(mha, nn.MultiheadAttention):
        raise TypeError(
            f"tome: {where} uses attention {type(mha).__name__}; only torch.nn.MultiheadAttention "
            "is supported there"
        )
    problems = []
    if batch_first and not mha.batch_first:
        problems.append("batch_first=False")
    if not mha._qkv_same_embed_dim:
        problems.append("separate kdim/vdim projections")
    if mha.bias_k is not None or mha.bias_v is not None:
        problems.append("add_bias_kv=True")
    if mha.add_zero_attn:
        problems.append("add_zero_attn=True")
    if problems:
        expected = "batch_first=True, " if batch_first else ""
        raise TypeError(
            f"tome: {where}: nn.MultiheadAttention with {', '.join(problems)} is not supported "
            f"(expected {expected}one packed in_proj, no bias_k/bias_v, no zero attention)"
        )


def self_attention(
    mha: nn.MultiheadAttention, x: torch.Tensor, bias: torch.Tensor | None, kernel: str = "sdpa"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of ``mha`` on ``x`` (B, N, C): ``(output, keys (B, N, heads, head_dim))``.

    ``bias`` is an additive float mask broadcastable to (B, heads, N, N), or ``None``; a per-key
    one ``(B, 1, 1, N)`` runs through ``kernel`` (:func:`tome.core.attention.key_bias_attention`).
    """
    B, N, C = x.shape
    heads = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.view(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
    dropout_p = mha.dropout if mha.training else 0.0
    if kernel != "sdpa" and is_key_bias(bias):
        out = key_bias_attention(q, k, v, bias[:, 0, 0, :], kernel=kernel, dropout_p=dropout_p)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    out = mha.out_proj(out.transpose(1, 2).reshape(B, N, C))
    return out, k.transpose(1, 2)
