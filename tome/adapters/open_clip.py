"""open_clip ``VisionTransformer``, and the image tower of ``CLIP`` / ``CustomTextCLIP``: merge
between attention and MLP in every residual block of the image tower; the text tower is never
touched (``encode_image`` merges, ``encode_text`` runs as before).

Each block is re-composed from its own submodules (``ln_1``, ``attn``, ``ln_attn``, ``ls_1``,
``ln_2``, ``mlp``, ``ls_2``), so the parts run as the installed open_clip version built them:

- ``ResidualAttentionBlock`` (the default): its ``nn.MultiheadAttention`` does not expose its
  keys, so attention is computed from the module's own parameters, as the torchvision adapter
  does (one packed ``in_proj``, ``scaled_dot_product_attention`` with proportional attention as
  its float ``attn_mask``, ``out_proj``). Sequence-first blocks (``batch_first=False``) get their
  tokens transposed on the way in and out.
- ``CustomResidualAttentionBlock`` (``qk_norm``, ``scale_attn``, ``scale_heads``, ...): open_clip's
  own ``Attention`` runs as it is (fused SDPA path) and takes proportional attention as its
  ``attn_mask``; the keys are read from the output of ``attn.ln_k`` by a forward hook.

The class token is protected. Pooling sees the tokens brought back to the original length
whenever it reads more than the class token (``pool_type='avg'`` or ``'none'``, attentional
pooling), so an average is the size-weighted average of the merged tokens and attention pooling
counts every original token once; with ``pool_type='tok'`` the sequence output (``output_tokens``)
is unmerged only with ``unmerge_output``. ``forward_intermediates`` gives every intermediate at
the original length, each unmerged by its own block's merges, so feature maps keep their grid
(eagerly: while torch.compile / torch.export trace, the handle unmerges by the last block's
merges only, so an earlier merged intermediate raises a ValueError there).
Every installed function is module-level, so a patched model pickles and deep-copies.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters.common.classes import class_names
from tome.adapters.common.kernel import KernelHandle, kernel_of
from tome.adapters.common.mha import check_fused, self_attention
from tome.runtime.handle import BlockCall, ToMeHandle
from tome.runtime.registry import Adapter

_DEFAULT_PARTS = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")
_CUSTOM_PARTS = ("ln_1", "attn", "ln_attn", "ls_1", "ln_2", "mlp", "ls_2")
_BLOCKS = (
    "open_clip.transformer.ResidualAttentionBlock (nn.MultiheadAttention) or CustomResidualAttentionBlock"
)


def _has_parts(module: nn.Module, parts: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(module, p, None), nn.Module) for p in parts)


def _check_custom_attention(index: int, attn: nn.Module) -> None:
    problems = []
    if "Attention" not in class_names(attn, "open_clip") or not all(
        hasattr(attn, p) for p in ("in_proj_weight", "num_heads", "ln_k", "logit_scale", "use_fsdpa")
    ):
        problems.append(f"attention {type(attn).__name__} is not open_clip.transformer.Attention")
    elif attn.logit_scale is not None:
        problems.append("scaled cosine attention (scaled_cosine_attn=True) is not supported")
    elif not attn.use_fsdpa:
        problems.append("attention without scaled_dot_product_attention is not supported")
    elif not isinstance(attn.ln_k, nn.Module):
        problems.append("its attention has no ln_k module to read the keys from")
    if problems:
        raise TypeError(
            f"tome: open_clip block {index} (CustomResidualAttentionBlock): {'; '.join(problems)} "
            "(supported: open_clip's Attention on its fused SDPA path, with or without qk_norm, "
            "scale_heads, scale_attn_inner)"
        )


def _check_block(index: int, block: nn.Module) -> str:
    """``"default"`` or ``"custom"``: the kind of block, after checking its parts."""
    names = class_names(block, "open_clip")
    if "ResidualAttentionBlock" in names and _has_parts(block, _DEFAULT_PARTS):
        check_fused(block.attn, where=f"open_clip block {index}", batch_first=False)
        return "default"
    if "CustomResidualAttentionBlock" in names and _has_parts(block, _CUSTOM_PARTS):
        _check_custom_attention(index, block.attn)
        return "custom"
    raise TypeError(
        f"tome: open_clip block {index} is a {type(block).__module__}.{type(block).__qualname__}; "
        f"only {_BLOCKS} (with their parts {', '.join(_CUSTOM_PARTS)}) is supported"
    )


def _mask(
    handle: ToMeHandle, index: int, call: BlockCall, dtype: torch.dtype, attn_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """The block's attention mask: proportional attention, or the caller's own mask when the
    schedule merges nothing in this block (a merged sequence no longer fits it)."""
    if attn_mask is None:
        return handle.attention_bias(call, dtype)
    if handle.schedules_merges(index):
        raise ValueError(
            "tome: a patched open_clip block cannot merge tokens under a caller's attn_mask; set "
            "model.tome.r = 0 or unpatch the model"
        )
    return attn_mask


def _block_forward(
    block: nn.Module,
    index: int,
    handle: ToMeHandle,
    q_x: torch.Tensor,
    k_x: torch.Tensor | None = None,
    v_x: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    # ResidualAttentionBlock.forward(q_x, k_x, v_x, attn_mask): the image tower runs self-attention.
    if k_x is not None or v_x is not None:
        raise ValueError(
            f"tome: patched open_clip block {index} runs self-attention only (got k_x/v_x: "
            "cross-attention); unpatch the model to use it that way"
        )
    mha = block.attn
    if q_x.dim() != 3:
        raise ValueError(
            f"tome: open_clip block {index} expects (batch, tokens, width) tokens, got {tuple(q_x.shape)}"
        )
    x = q_x if mha.batch_first else q_x.transpose(0, 1)
    call = handle.begin_layer(index, x)
    mask = _mask(handle, index, call, x.dtype, attn_mask)
    if attn_mask is not None:
        # As ResidualAttentionBlock.attention: the mask in the tokens' dtype, added to the logits;
        # nn.MultiheadAttention's (batch * heads, L, S) layout as SDPA's (batch, heads, L, S).
        mask = mask.to(x.dtype)
        if mask.dim() == 3:
            mask = mask.view(x.shape[0], mha.num_heads, *mask.shape[-2:])
    attn_out, keys = self_attention(mha, block.ln_1(x), mask, kernel_of(handle, attn_mask))
    x = x + block.ls_1(attn_out)
    metric = handle.similarity_features(keys) if handle.wants_keys(index, x.shape[1]) else None
    x = handle.merge_layer(call, x, metric)
    x = handle.end_layer(call, x + block.ls_2(block.mlp(block.ln_2(x))))
    # Sequence-first: the next block (or the Transformer) transposes this view back to x itself,
    # which is registered with its pass.
    return x if mha.batch_first else x.transpose(0, 1)


def _custom_block_forward(
    block: nn.Module, index: int, handle: ToMeHandle, x: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    call = handle.begin_layer(index, x)
    mask = _mask(handle, index, call, x.dtype, attn_mask)
    handle.take_keys()  # nothing left over from an interrupted call in this thread
    x = x + block.ls_1(block.ln_attn(block.attn(block.ln_1(x), attn_mask=mask)))
    x = handle.merge_layer(call, x, handle.take_keys())
    return handle.end_layer(call, x + block.ls_2(block.mlp(block.ln_2(x))))


def _key_hook(index: int, handle: ToMeHandle, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    # attn.ln_k's output, k: (B, heads, N, head_dim) -> the matching metric of this thread's block.
    handle.offer_keys(index, output.transpose(1, 2))


def _wants_unmerged(handle: ToMeHandle, pools_tokens: bool) -> bool:
    return pools_tokens or handle.unmerge_output


def _output_hook(
    handle: ToMeHandle, pools_tokens: bool, module: nn.Module, args: tuple, output: torch.Tensor
) -> torch.Tensor | None:
    # The image tower's Transformer: its output goes to pooling (and to output_tokens).
    if not _wants_unmerged(handle, pools_tokens) or not isinstance(output, torch.Tensor):
        return None
    if not torch.compiler.is_compiling() and handle.history_of(output) is None:
        return None  # not the output of a pass of this model
    return handle.unmerge(output)


def _forward_intermediates(transformer: nn.Module, handle: ToMeHandle, pools_tokens: bool, *args, **kwargs):
    x, intermediates = type(transformer).forward_intermediates(transformer, *args, **kwargs)
    # Dense features: every intermediate at the original length (each by its own block's merges).
    intermediates = [handle.unmerge(y) for y in intermediates]
    if _wants_unmerged(handle, pools_tokens):
        x = handle.unmerge(x)
    return x, intermediates


def _vision_tower(model: nn.Module) -> nn.Module:
    if "VisionTransformer" in class_names(model, "open_clip"):
        return model
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module) and "VisionTransformer" in class_names(visual, "open_clip"):
        return visual
    kind = type(visual).__name__ if visual is not None else "missing"
    hint = ""
    if kind == "TimmModel":
        hint = " (its timm trunk can be patched on its own: tome.patch(model.visual.trunk))"
    raise TypeError(
        f"tome: {type(model).__name__}.visual is {kind}; the open_clip adapter merges tokens in an "
        f"open_clip.transformer.VisionTransformer image tower{hint}"
    )


def apply(model: nn.Module, *, r, **settings) -> ToMeHandle:
    visual = _vision_tower(model)
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(transformer, "batch_first"):
        raise TypeError(
            "tome: expected an open_clip VisionTransformer whose .transformer is an open_clip "
            "Transformer with .resblocks (nn.ModuleList) and .batch_first (open_clip 2.26 or later)"
        )
    kinds = [_check_block(index, block) for index, block in enumerate(blocks)]
    dropout = getattr(visual, "patch_dropout", None)
    if getattr(dropout, "exclude_first_token", True) is False:
        raise TypeError(
            "tome: the open_clip VisionTransformer's patch_dropout may drop the class token "
            "(exclude_first_token=False); tome keeps the class token first and unmerged"
        )
    # Pooling that reads more than the class token sees every original token once.
    pools_tokens = (
        getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok"
    )
    handle = KernelHandle(
        len(blocks),
        r,
        protected=1,  # the class token
        **settings,
    )
    with handle.installing():
        for index, (block, kind) in enumerate(zip(blocks, kinds, strict=True)):
            if kind == "custom":
                handle.install_hook(block.attn.ln_k, _key_hook, index, handle)
                handle.install_method(block, "forward", _custom_block_forward, index, handle)
            else:
                handle.install_method(block, "forward", _block_forward, index, handle)
        handle.install_hook(transformer, _output_hook, handle, pools_tokens)
        if hasattr(type(transformer), "forward_intermediates"):
            handle.install_method(
                transformer, "forward_intermediates", _forward_intermediates, handle, pools_tokens
            )
    return handle


ADAPTER = Adapter(
    patches=("open_clip.VisionTransformer", "open_clip.CLIP", "open_clip.CustomTextCLIP"),
    apply=apply,
    merged="the image tower only (`encode_text` untouched); pooling size-weighted",
    tested_on="tiny random configs",
    handle=KernelHandle,
)
