"""timm ``VisionTransformer``: merge between attention and MLP in every ``Block``.

Each block is re-composed from its own submodules (norms, attention, LayerScale, drop-path,
MLP), so whatever timm version built it, its parts run as they are. The attention module keeps
its own fused/unfused path; proportional attention goes in as its float ``attn_mask``. Keys (the
matching metric) are read from the output of ``attn.k_norm`` by a forward hook: nothing is
computed twice. Every installed function is module-level and gets its block index and the
handle as bound arguments, so a patched model pickles and deep-copies.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters.common.timm import VISION
from tome.runtime.handle import ToMeHandle
from tome.runtime.registry import CARRY, Adapter

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "k_norm", "proj", "num_heads")


def _check_block(index: int, block: nn.Module) -> None:
    if type(block).__name__ != "Block" or not all(hasattr(block, p) for p in _BLOCK_PARTS):
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
    if (attn_mask is not None or is_causal) and handle.schedules_merges(index):
        raise ValueError(
            "tome: a patched timm block cannot merge tokens under a user attn_mask/is_causal; "
            "set model.tome.r = 0 or unpatch the model"
        )
    call = handle.begin_layer(index, x)
    bias = handle.attention_bias(call, x.dtype)
    if attn_mask is not None or is_causal:
        bias = attn_mask
    handle.take_keys()  # nothing left over from an interrupted call in this thread
    attn_out = block.attn(block.norm1(x), attn_mask=bias, is_causal=is_causal)
    x = x + block.drop_path1(block.ls1(attn_out))
    x = handle.merge_layer(call, x, handle.take_keys())
    return handle.end_layer(call, x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))))


def _key_hook(index: int, handle: ToMeHandle, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    # k: (B, heads, N, head_dim) -> the matching metric of the block running in this thread.
    handle.offer_keys(index, output.transpose(1, 2))


def _norm_hook(handle: ToMeHandle, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    # The final norm's output belongs to the pass of its input (for pool and unmerge).
    handle.follow(output, args[0])


def _forward_features(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    x = type(model).forward_features(model, *args, **kwargs)
    return model.tome.unmerge(x) if model.tome.unmerge_output else x


def _pool(model: nn.Module, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    # Reading the class token needs nothing; every other pooling (avg, max, attention pooling)
    # is computed over the tokens brought back to the original length, so each original token
    # counts once: the size-weighted average of the merged tokens.
    kind = model.global_pool if pool_type is None else pool_type
    if model.attn_pool is not None or kind != "token":
        x = model.tome.unmerge(x)
    return type(model).pool(model, x, pool_type)


def apply(model: nn.Module, *, r, **settings) -> ToMeHandle:
    blocks = list(model.blocks)
    for index, block in enumerate(blocks):
        _check_block(index, block)
    if not hasattr(type(model), "pool"):
        raise TypeError("tome: this timm version's VisionTransformer has no pool(); please upgrade timm")
    handle = ToMeHandle(
        len(blocks),
        r,
        protected=model.num_prefix_tokens,
        **settings,
    )
    with handle.installing():
        for index, block in enumerate(blocks):
            handle.install_hook(block.attn.k_norm, _key_hook, index, handle)
            handle.install_method(block, "forward", _block_forward, index, handle)
        handle.install_hook(model.norm, _norm_hook, handle)
        handle.install_method(model, "forward_features", _forward_features)
        handle.install_method(model, "pool", _pool)
    return handle


ADAPTER = Adapter(
    library="timm",
    classes=("VisionTransformer",),
    kind=CARRY,
    title="timm vision transformers",
    apply=apply,
    handle=ToMeHandle,
    merged="between attention and MLP in every `Block`; avg/attention pooling size-weighted",
    tested_on="tiny random configs (ViT, DeiT, DINOv2, registers, qk-norm); real DINOv2-S/14",
    vision=VISION,
)
