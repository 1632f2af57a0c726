"""A plain implementation of the published ToMe algorithm, to race against in the benchmarks.

Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023) as the paper
describes it, written here from the paper, for timm ``VisionTransformer`` blocks with a class
token. It is deliberately straightforward, the way the algorithm is usually implemented:

- attention computed explicitly (``softmax(q k^T / sqrt(d) + log(size))`` with the size
  bias of proportional attention, then ``@ v``), with the block's own submodules;
- bipartite soft matching on the keys averaged over heads: tokens alternately in sets A and B,
  cosine similarity A x B, the class token never merged, each A token's best B edge, the ``r``
  strongest edges merged; the merged sequence is the unmerged A tokens (in order, class token
  first) followed by the B tokens;
- size-weighted average: ``x * size``, summed into the destinations with ``scatter_reduce``,
  divided by the summed sizes;
- source tracking with a dense ``(B, N, N0)`` 0/1 matrix, merged like the tokens.

Used only by ``benchmarks/speed.py``; not part of the library. ``apply(model, r)`` replaces
each block's forward on the instance; ``remove(model)`` restores the class's.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from tome.core.schedule import Schedule, resolve_schedule

__all__ = ["ReferenceState", "apply", "bipartite_soft_matching", "merge_source", "merge_wavg", "remove"]


class ReferenceState:
    """Per-pass state shared by the blocks of one model: per-layer r, sizes, source."""

    def __init__(self, r_per_layer: list[int], trace_source: bool) -> None:
        self.r_per_layer = r_per_layer
        self.trace_source = trace_source
        self.size: torch.Tensor | None = None  # (B, N, 1)
        self.source: torch.Tensor | None = None  # (B, N, N0) 0/1
        self.tokens_per_layer: list[int] = []


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices into set A (``metric[:, ::2]``) of the tokens that stay (``keep``, sorted) and
    of those merged (``src``), and the B token each ``src`` goes into (``dst``)."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        scores[:, 0, :] = float("-inf")  # the class token (first A token) is never merged
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src = order[:, :r]
        keep = order[:, r:].sort(dim=-1).values  # original order: the class token stays first
        dst = partner.gather(1, src)
    return keep, src, dst


def _merge(x: torch.Tensor, keep: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Sum the ``src`` tokens of A into their ``dst`` tokens of B; ``(B, N - r, F)``."""
    a, b = x[:, ::2], x[:, 1::2]
    width = x.shape[-1]
    kept = a.gather(1, keep[..., None].expand(-1, -1, width))
    moved = a.gather(1, src[..., None].expand(-1, -1, width))
    b = b.scatter_reduce(1, dst[..., None].expand(-1, -1, width), moved, reduce="sum")
    return torch.cat([kept, b], dim=1)


def merge_wavg(
    x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the merged tokens, and the new sizes ``(B, N - r, 1)``."""
    x = _merge(x * size, keep, src, dst)
    size = _merge(size, keep, src, dst)
    return x / size, size


def merge_source(
    source: torch.Tensor, keep: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
) -> torch.Tensor:
    """The dense ``(B, N - r, N0)`` source matrix after the merge."""
    return _merge(source, keep, src, dst)


def _attention(
    attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit multi-head attention with proportional attention; also the keys averaged over
    heads (the matching metric)."""
    B, N = x.shape[:2]
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    weights = attn.attn_drop(logits.softmax(dim=-1))
    out = (weights @ v).transpose(1, 2).reshape(B, N, -1)
    out = attn.proj_drop(attn.proj(attn.norm(out)))
    return out, k.mean(dim=1)


def _make_block_forward(index: int, state: ReferenceState):
    def forward(block: nn.Module, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if index == 0:
            B, N = x.shape[:2]
            state.size = None
            state.tokens_per_layer = [N]
            state.source = None
            if state.trace_source:
                state.source = torch.eye(N, device=x.device, dtype=x.dtype).expand(B, N, N)
        attn_out, metric = _attention(block.attn, block.norm1(x), state.size)
        x = x + block.drop_path1(block.ls1(attn_out))
        r = min(state.r_per_layer[index], (x.shape[1] - 1) // 2)
        if r > 0:
            keep, src, dst = bipartite_soft_matching(metric, r)
            size = state.size if state.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)
            x, state.size = merge_wavg(x, size, keep, src, dst)
            if state.source is not None:
                state.source = merge_source(state.source, keep, src, dst)
        state.tokens_per_layer.append(x.shape[1])
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    return forward


def apply(model: nn.Module, r: Schedule, trace_source: bool = True) -> ReferenceState:
    """Make the timm ``VisionTransformer`` ``model`` merge tokens the reference way (in place);
    returns the state (``tokens_per_layer`` and ``source`` after a forward pass)."""
    blocks = list(model.blocks)
    if getattr(model, "num_prefix_tokens", 1) != 1:
        raise ValueError("reference ToMe: only models with exactly one class token")
    for block in blocks:
        if getattr(block.attn, "gate", None) is not None:
            raise ValueError("reference ToMe: gated attention is not supported")
    state = ReferenceState(resolve_schedule(r, len(blocks)), trace_source)
    for index, block in enumerate(blocks):
        block.forward = types.MethodType(_make_block_forward(index, state), block)
    model._reference_tome = state
    return state


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`."""
    for block in model.blocks:
        block.__dict__.pop("forward", None)
    model.__dict__.pop("_reference_tome", None)
    return model
