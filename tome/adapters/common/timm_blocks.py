"""The timm adapters' shared block pieces (:mod:`tome.adapters.timm_vit`,
:mod:`tome.adapters.timm_eva`, :mod:`tome.adapters.timm_naflex`): timm's ViT ``Block`` and Eva's
``EvaBlock`` / ``EvaBlockPostNorm`` re-composed from their own parts with a merge between
attention and MLP, the hooks that hand the keys and the final norm's output to the handle, and
the model methods that patching replaces (``forward_features``, ``pool``,
``forward_intermediates``).

Everything here is module-level (installed functions pickle by name) and takes the handle and
the block index as arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from tome.adapters.common.kernel import is_key_bias
from tome.core.attention import key_bias_attention
from tome.runtime.handle import BlockCall, ToMeHandle

__all__ = [
    "VIT_BLOCK_PARTS",
    "begin_block",
    "check_eva_block",
    "forward_features",
    "forward_intermediates",
    "install",
    "key_hook",
    "norm_hook",
    "pool",
    "run_eva_block",
    "run_vit_block",
    "vit_attention",
]

# the parts of timm.models.vision_transformer.Block
VIT_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
# Eva block class -> its parts (pre-norm EVA-02 block; post-norm block of EVA-02-E)
_EVA_BLOCK_PARTS = {
    "EvaBlock": ("norm1", "attn", "gamma_1", "drop_path1", "norm2", "mlp", "gamma_2", "drop_path2"),
    "EvaBlockPostNorm": ("attn", "norm1", "drop_path1", "mlp", "norm2", "drop_path2"),
}
_EVA_ATTENTIONS = ("EvaAttention", "AttentionRope")
_EVA_ATTN_PARTS = ("k_norm", "num_heads", "num_prefix_tokens")


# -- blocks ---------------------------------------------------------------------------------------


def begin_block(
    handle: ToMeHandle,
    index: int,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    where: str,
) -> tuple[BlockCall, torch.Tensor | None]:
    """The call of block ``index`` on ``x`` and the attention mask it runs with: proportional
    attention, or the user's ``attn_mask`` / ``is_causal`` as they are, which a merging block
    refuses (a clear error naming ``where``, e.g. ``"timm"``)."""
    if (attn_mask is not None or is_causal) and handle.schedules_merges(index):
        raise ValueError(
            f"tome: a patched {where} block cannot merge tokens under a user attn_mask/is_causal; "
            "set model.tome.r = 0 or unpatch the model"
        )
    call = handle.begin_layer(index, x)
    bias = handle.attention_bias(call, x.dtype)
    if attn_mask is not None or is_causal:
        bias = attn_mask
    return call, bias


def run_vit_block(
    block: nn.Module,
    handle: ToMeHandle,
    call: BlockCall,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    is_causal: bool = False,
    kernel: str = "sdpa",
) -> torch.Tensor:
    """One timm ViT ``Block`` re-composed from its parts, merging after the attention residual;
    ``kernel``: how proportional attention runs (:func:`vit_attention`)."""
    handle.take_keys()  # nothing left over from an interrupted call in this thread
    attn_out = vit_attention(block.attn, block.norm1(x), bias, is_causal, kernel)
    x = x + block.drop_path1(block.ls1(attn_out))
    x = handle.merge_layer(call, x, handle.take_keys())
    return handle.end_layer(call, x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))))


def vit_attention(
    attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, is_causal: bool, kernel: str
) -> torch.Tensor:
    """timm's ``Attention`` on ``x`` with the float mask ``bias``: its own forward, or, for
    ``kernel="flex"`` and a per-key mask ``(B, 1, 1, N)`` (proportional attention, padding), its
    parts with the attention itself run by :func:`tome.core.attention.key_bias_attention`'s
    FlexAttention kernel (the bias added by a ``score_mod``: fused on CUDA, where SDPA with a
    float mask cannot use FlashAttention)."""
    if kernel == "sdpa" or not is_key_bias(bias) or is_causal or not getattr(attn, "fused_attn", True):
        return attn(x, attn_mask=bias, is_causal=is_causal)
    B, N, _ = x.shape
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)  # k_norm's hook offers the keys, as in timm's forward
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out = key_bias_attention(q, k, v, bias[:, 0, 0, :], kernel=kernel, dropout_p=dropout_p)
    out = out.transpose(1, 2).reshape(B, N, -1)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def check_eva_block(index: int, block: nn.Module, num_prefix_tokens: int, where: str = "timm Eva") -> str:
    """The kind of an Eva block (``"EvaBlock"`` or ``"EvaBlockPostNorm"``), or a clear error
    naming the block and what is supported."""
    kind = type(block).__name__
    parts = _EVA_BLOCK_PARTS.get(kind)
    if parts is None or not all(hasattr(block, p) for p in parts):
        raise TypeError(
            f"tome: {where} block {index} is a {kind}; supported: timm.models.eva.EvaBlock and "
            "EvaBlockPostNorm (with their norm1/attn/drop_path1/norm2/mlp/drop_path2 parts)"
        )
    attn = block.attn
    if type(attn).__name__ not in _EVA_ATTENTIONS or not all(hasattr(attn, p) for p in _EVA_ATTN_PARTS):
        raise TypeError(
            f"tome: {where} block {index} uses attention {type(attn).__name__}; supported: "
            f"timm's {' and '.join(_EVA_ATTENTIONS)} (with k_norm, num_heads, num_prefix_tokens)"
        )
    if attn.num_prefix_tokens != num_prefix_tokens:
        raise TypeError(
            f"tome: {where} block {index} rotates all but its first {attn.num_prefix_tokens} tokens, "
            f"but the model has {num_prefix_tokens} prefix tokens; expected them to agree"
        )
    return kind


def run_eva_block(
    block: nn.Module,
    kind: str,
    handle: ToMeHandle,
    call: BlockCall,
    x: torch.Tensor,
    rope: torch.Tensor | None,
    bias: torch.Tensor | None,
    is_causal: bool = False,
) -> torch.Tensor:
    """One Eva block (``kind``: from :func:`check_eva_block`) re-composed from its parts,
    merging after the attention residual; ``rope``: the rotary embedding of the current tokens
    (:func:`tome.adapters.common.rope.block_rope`)."""
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


# -- hooks ----------------------------------------------------------------------------------------


def key_hook(index: int, handle: ToMeHandle, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook of ``attn.k_norm``: its keys ``(B, heads, N, head_dim)`` become the matching
    metric of the block ``index`` running in this thread."""
    handle.offer_keys(index, output.transpose(1, 2))


def norm_hook(handle: ToMeHandle, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook of the final norm: its output belongs to the pass of its input (for pool and
    unmerge)."""
    handle.follow(output, args[0])


# -- model methods --------------------------------------------------------------------------------


def forward_features(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    """``forward_features`` of a patched model: the model's own, unmerged with
    ``unmerge_output``."""
    x = type(model).forward_features(model, *args, **kwargs)
    return model.tome.unmerge(x) if model.tome.unmerge_output else x


def pool(model: nn.Module, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """``pool`` of a patched model. Reading the class token needs nothing; every other pooling
    (avg, max, attention pooling) is computed over the tokens brought back to the original
    length, so each original token counts once: the size-weighted average of the merged
    tokens."""
    kind = model.global_pool if pool_type is None else pool_type
    if model.attn_pool is not None or kind != "token":
        x = model.tome.unmerge(x)
    return type(model).pool(model, x, pool_type)


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


# -- patching -------------------------------------------------------------------------------------


def install(
    handle: ToMeHandle,
    model: nn.Module,
    blocks: Sequence[nn.Module],
    forwards: Sequence[tuple],
    methods: Mapping[str, Callable],
) -> None:
    """Patch a timm model (all or nothing): block ``i`` gets the key hook on its ``attn.k_norm``
    and the forward ``forwards[i]`` = ``(function, *bound)``, called as ``function(block, i,
    handle, *bound, ...)``; the final norm gets :func:`norm_hook`; the model gets each of
    ``methods`` (name -> function) that its class has (``forward_intermediates`` is optional;
    adapters check the methods they need before)."""
    with handle.installing():
        for index, (block, (forward, *bound)) in enumerate(zip(blocks, forwards, strict=True)):
            handle.install_hook(block.attn.k_norm, key_hook, index, handle)
            handle.install_method(block, "forward", forward, index, handle, *bound)
        handle.install_hook(model.norm, norm_hook, handle)
        for name, function in methods.items():
            if hasattr(type(model), name):
                handle.install_method(model, name, function)
