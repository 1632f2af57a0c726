"""Attention with a per-key bias, the form proportional attention takes: ``softmax(q k^T * scale
+ bias[b, key]) v``, through one of two kernels.

- ``"sdpa"``: ``scaled_dot_product_attention`` with the bias as a ``(B, 1, 1, N)`` float mask.
  On CUDA a float mask rules out the FlashAttention kernel; SDPA runs its memory-efficient one.
- ``"flex"``: FlexAttention with the bias added by a ``score_mod``: one fused kernel on CUDA (and
  a generated C++ one on the CPU), with no ``(B, heads, N, N)`` mask. It runs a
  ``flex_attention`` compiled once per process with dynamic shapes (every merging block sees
  another token count; one compilation serves them all). The SDPA kernel runs instead where
  FlexAttention cannot: with ``dropout_p > 0`` (FlexAttention has no dropout), and while
  ``torch.compile`` traces the model: torch 2.14's Dynamo drops the Python attribute writes that
  follow a ``flex_attention`` call in a graph once an attribute was written before it, and the
  merge's per-pass bookkeeping is such writes (``tests/test_attention.py`` keeps the reproduction).

Example:
    >>> import torch
    >>> from tome.core.attention import key_bias_attention
    >>> q = k = v = torch.randn(2, 3, 5, 8)
    >>> sizes = torch.tensor([[1.0, 2, 1, 3, 1], [1, 1, 1, 1, 4]])
    >>> out = key_bias_attention(q, k, v, sizes.log())
    >>> out.shape
    torch.Size([2, 3, 5, 8])
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["KERNELS", "key_bias_attention"]

KERNELS = ("sdpa", "flex")


@functools.cache
def _compiled_flex():
    # Compiled on first use, once per process (torch caches the compiled code, not this module's
    # state): dynamic shapes, since each merging block attends over another number of tokens.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, scale) -> torch.Tensor:
    flex_attention = _compiled_flex()

    def add_key_bias(score, batch, head, query, key):
        return score + key_bias[batch, key]

    return flex_attention(q, k, v, score_mod=add_key_bias, scale=scale)


def key_bias_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    *,
    kernel: str = "sdpa",
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of ``q``, ``k``, ``v`` (``(B, heads, N, head_dim)``) with ``key_bias`` (``(B, N)``,
    added to every query's logit of that key; ``None``: no bias) through ``kernel`` (one of
    :data:`KERNELS`). Both kernels give the same result within float rounding."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
    if key_bias is not None and (key_bias.dim() != 2 or key_bias.shape != (k.shape[0], k.shape[-2])):
        raise ValueError(
            f"key_bias: expected shape (batch, keys) = {(k.shape[0], k.shape[-2])}, got {tuple(key_bias.shape)}"
        )
    if kernel == "flex" and key_bias is not None and dropout_p == 0.0 and not torch.compiler.is_compiling():
        return _flex(q, k, v, key_bias, scale)
    mask = None if key_bias is None else key_bias.to(q.dtype)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
