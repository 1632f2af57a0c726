"""timm ``NaFlexVit``: batches of images of different sizes (padded, with ``patch_valid``), merged
image by image.

Each block (timm's ViT ``Block``, or an ``EvaBlock`` when the model uses RoPE / SwiGLU) is
re-composed from its own parts, merging between attention and MLP, as for
:mod:`tome.adapters.timm_vit` and :mod:`tome.adapters.timm_eva` (rotary positions of merged tokens: the
size-weighted mean of their patches' ``sin``/``cos``, see there).

Padding (the *masked* kind of adapter, the rule of :mod:`tome.adapters.transformers_text`): the
attention mask NaFlexVit builds from ``patch_valid`` marks padding. Padding patches get size 0,
never merge with real patches, are never attended to, and every image merges its own patches by
its own similarities (:func:`tome.core.merge.masked_soft_matching`, :func:`tome.core.merge.per_row_r`): an
image gives the same output alone or in any batch. With ``ratio`` a small image loses few tokens
and a large one many; with ``r`` every image removes ``r`` tokens per block (at most half of its
own). A mask that is not a key-padding mask (a user's ``attn_mask`` with other structure) is
refused when tokens merge, never silently replaced.

Pooling (avg / max / attention pooling) reads the tokens brought back to the original length, so
``patch_valid`` applies as it is and every original patch counts once. In NaFlex mode
``forward_features`` returns ``{"patches", "patch_valid"}``: ``patches`` merged (or, with
``unmerge_output``, at the original length), ``patch_valid`` the original one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters.common.rope import RopeHandle, block_rope
from tome.adapters.common.timm_blocks import (
    VIT_BLOCK_PARTS,
    check_eva_block,
    forward_intermediates,
    install,
    run_eva_block,
    run_vit_block,
)
from tome.runtime.handle import BlockCall, ToMeHandle
from tome.runtime.registry import MASKED, Adapter


def _check_block(index: int, block: nn.Module, num_prefix_tokens: int) -> str:
    if type(block).__name__ == "Block":
        if not all(hasattr(block, p) for p in VIT_BLOCK_PARTS) or not hasattr(block.attn, "k_norm"):
            raise TypeError(
                f"tome: timm NaFlexVit block {index} is a Block without the parts of "
                "timm.models.vision_transformer.Block (norm1/attn with k_norm/ls1/drop_path1/norm2/mlp/...)"
            )
        return "Block"
    if type(block).__name__ in ("EvaBlock", "EvaBlockPostNorm"):
        return check_eva_block(index, block, num_prefix_tokens, where="timm NaFlexVit")
    raise TypeError(
        f"tome: timm NaFlexVit block {index} is a {type(block).__name__}; supported: "
        "timm.models.vision_transformer.Block and timm.models.eva.EvaBlock (NaFlexVit's default "
        "blocks, without and with RoPE)"
    )


def _key_padding(handle: ToMeHandle, index: int, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` key validity of the mask NaFlexVit builds from ``patch_valid`` (``(B, 1, N, N)``
    symmetric or ``(B, 1, 1, N)`` key-only); refuses any other structure when tokens merge."""
    B, N = x.shape[:2]
    if attn_mask.dim() != 4 or attn_mask.shape[0] not in (1, B) or attn_mask.shape[-1] != N:
        raise ValueError(
            f"attn_mask: tome merges under a (B, 1, N, N) or (B, 1, 1, N) attention mask with N = {N} "
            f"tokens, got shape {tuple(attn_mask.shape)}"
        )
    key_mask = handle.key_mask_from(attn_mask).expand(B, N)
    merges = any(handle.schedules_merges(i) for i in range(index, handle.num_layers))
    if merges and not torch.compiler.is_compiling():
        # Merged tokens get a key-padding mask (plus log size) in every later block: anything
        # else the mask says would be dropped, so refuse it (one check per pass).
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask
        else:
            allowed = attn_mask > torch.finfo(attn_mask.dtype).min / 2
        queries = key_mask[:, None, :, None] if attn_mask.shape[-2] == N else True
        if bool(((allowed != key_mask[:, None, None, :]) & queries).any()):
            raise ValueError(
                "attn_mask: tome merges NaFlexVit tokens under a key-padding mask only (the one the "
                "model builds from patch_valid: real patches attend to every real patch); this mask "
                "has other structure. Set model.tome.r = 0 or unpatch the model to use it"
            )
    return key_mask


def _begin(handle: ToMeHandle, index: int, x: torch.Tensor, attn_mask: torch.Tensor | None) -> BlockCall:
    if index != 0 or attn_mask is None:
        return handle.begin_layer(index, x)
    return handle.begin_layer(0, x, key_mask=_key_padding(handle, index, x, attn_mask))


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
    if is_causal and handle.schedules_merges(index):
        raise ValueError("tome: a patched NaFlexVit block cannot merge tokens with is_causal=True")
    call = _begin(handle, index, x, attn_mask)
    # The model's own mask until something merged; then log(size), padding keys masked.
    bias = handle.attention_bias(call, x.dtype) if call.merged else attn_mask
    if kind != "Block":
        return run_eva_block(block, kind, handle, call, x, block_rope(handle, call, rope), bias, is_causal)
    return run_vit_block(block, handle, call, x, bias, is_causal)


def _vit_block_forward(
    block: nn.Module,
    index: int,
    handle: ToMeHandle,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    # timm's ViT Block takes no rope.
    return _block_forward(block, index, handle, "Block", x, None, attn_mask, is_causal)


def _forward_features(model: nn.Module, *args, **kwargs):
    out = type(model).forward_features(model, *args, **kwargs)
    if not model.tome.unmerge_output:
        return out
    if isinstance(out, dict):  # NaFlex mode: {"patches", "patch_valid"}
        return {**out, "patches": model.tome.unmerge(out["patches"])}
    return model.tome.unmerge(out)


def _pool(
    model: nn.Module, x: torch.Tensor, pool_type: str | None = None, patch_valid: torch.Tensor | None = None
) -> torch.Tensor:
    # Class-token pooling reads token 0; every other pooling runs on the tokens brought back to
    # the original length, where ``patch_valid`` applies and each original patch counts once.
    kind = model.global_pool if pool_type is None else pool_type
    if model.attn_pool is not None or kind != "token":
        x = model.tome.unmerge(x)
    return type(model)._pool(model, x, pool_type=pool_type, patch_valid=patch_valid)


def apply(model: nn.Module, *, r, **settings) -> ToMeHandle:
    blocks = list(model.blocks)
    kinds = [_check_block(i, block, model.num_prefix_tokens) for i, block in enumerate(blocks)]
    for name in ("_pool", "forward_features"):
        if not hasattr(type(model), name):
            raise TypeError(f"tome: this timm version's NaFlexVit has no {name}(); please upgrade timm")
    handle = RopeHandle(len(blocks), r, protected=model.num_prefix_tokens, **settings)
    forwards = [(_vit_block_forward,) if kind == "Block" else (_block_forward, kind) for kind in kinds]
    methods = {
        "forward_features": _forward_features,
        "_pool": _pool,
        "forward_intermediates": forward_intermediates,
    }
    install(handle, model, blocks, forwards, methods)
    return handle


ADAPTER = Adapter(
    patches=("timm.NaFlexVit",),
    apply=apply,
    kind=MASKED,
    handle=RopeHandle,
    title="timm vision transformers with rotary positions (Eva, NaFlexVit)",
    merged="between attention and MLP (ViT `Block` or RoPE `EvaBlock`); each image merges its own patches, "
    "padding changes none of them; pooling with `patch_valid` size-weighted",
    tested_on="tiny random configs (learned / RoPE / mixed-RoPE positions, registers, attention pooling, "
    "key-only mask)",
)
