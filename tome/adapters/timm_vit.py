"""timm ``VisionTransformer``: merge between attention and MLP in every ``Block``.

Each block is re-composed from its own submodules (norms, attention, LayerScale, drop-path,
MLP), so whatever timm version built it, its parts run as they are. The attention module keeps
its own fused/unfused path; proportional attention goes in as its float ``attn_mask``. Keys (the
matching metric) are read from the output of ``attn.k_norm`` by a forward hook: nothing is
computed twice. Every installed function is module-level and gets its block index and the
handle as bound arguments, so a patched model pickles and deep-copies. The block, the hooks and
the model methods are shared with the other timm adapters
(:mod:`tome.adapters.common.timm_blocks`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters.common.kernel import KernelHandle, kernel_of
from tome.adapters.common.timm import VISION
from tome.adapters.common.timm_blocks import (
    VIT_BLOCK_PARTS,
    begin_block,
    forward_features,
    install,
    pool,
    run_vit_block,
)
from tome.runtime.handle import ToMeHandle
from tome.runtime.registry import Adapter

_ATTN_PARTS = ("qkv", "k_norm", "proj", "num_heads")


def _check_block(index: int, block: nn.Module) -> None:
    if type(block).__name__ != "Block" or not all(hasattr(block, p) for p in VIT_BLOCK_PARTS):
        raise TypeError(
            f"tome: timm block {index} is a {type(block).__name__}; only the standard pre-norm "
            "timm.models.vision_transformer.Block is supported"
        )
    attn = block.attn
    if type(attn).__name__ != "Attention" or not all(hasattr(attn, p) for p in _ATTN_PARTS):
        raise TypeError(
            f"tome: timm block {index} uses attention {type(attn).__name__}; only "
            "timm.layers.Attention (fused qkv) is supported"
        )


def _block_forward(
    block: nn.Module,
    index: int,
    handle: ToMeHandle,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    call, bias = begin_block(handle, index, x, attn_mask, is_causal, "timm")
    return run_vit_block(block, handle, call, x, bias, is_causal, kernel_of(handle, attn_mask))


def apply(model: nn.Module, *, r, **settings) -> ToMeHandle:
    blocks = list(model.blocks)
    for index, block in enumerate(blocks):
        _check_block(index, block)
    if not hasattr(type(model), "pool"):
        raise TypeError("tome: this timm version's VisionTransformer has no pool(); please upgrade timm")
    handle = KernelHandle(
        len(blocks),
        r,
        protected=model.num_prefix_tokens,
        **settings,
    )
    methods = {"forward_features": forward_features, "pool": pool}
    install(handle, model, blocks, [(_block_forward,)] * len(blocks), methods)
    return handle


ADAPTER = Adapter(
    patches=("timm.VisionTransformer",),
    apply=apply,
    merged="between attention and MLP in every `Block`; avg/attention pooling size-weighted",
    tested_on="tiny random configs (ViT, DeiT, DINOv2, registers, qk-norm); real DINOv2-S/14",
    handle=KernelHandle,
    vision=VISION,
)
