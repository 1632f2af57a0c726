"""torchvision ``VisionTransformer``: merge between attention and MLP in every ``EncoderBlock``.

Each block is re-composed from its own submodules (``ln_1``, ``self_attention``, ``dropout``,
``ln_2``, ``mlp``). ``nn.MultiheadAttention`` does not expose its keys, so attention is computed
here from the module's own parameters: one ``F.linear`` with ``in_proj_weight``/``in_proj_bias``
gives q, k and v; ``scaled_dot_product_attention`` takes proportional attention as its float
``attn_mask``; ``out_proj`` projects back. The keys give the matching metric.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters.common.kernel import KernelHandle, kernel_of
from tome.adapters.common.mha import check_fused, self_attention
from tome.runtime.handle import ToMeHandle
from tome.runtime.registry import Adapter, InputSizes, VisionInfo

_BLOCK_PARTS = ("ln_1", "self_attention", "dropout", "ln_2", "mlp")


def _check_block(index: int, block: nn.Module) -> None:
    if type(block).__name__ != "EncoderBlock" or not all(hasattr(block, p) for p in _BLOCK_PARTS):
        raise TypeError(
            f"tome: torchvision encoder layer {index} is a {type(block).__name__}; only "
            "torchvision.models.vision_transformer.EncoderBlock is supported"
        )
    check_fused(block.self_attention, where=f"torchvision encoder layer {index}")


def _block_forward(block: nn.Module, index: int, handle: ToMeHandle, input: torch.Tensor) -> torch.Tensor:
    if input.dim() != 3:
        raise ValueError(f"Expected (batch_size, seq_length, hidden_dim) got {tuple(input.shape)}")
    call = handle.begin_layer(index, input)
    bias = handle.attention_bias(call, input.dtype)
    attn_out, keys = self_attention(block.self_attention, block.ln_1(input), bias, kernel_of(handle, None))
    x = input + block.dropout(attn_out)
    metric = handle.similarity_features(keys) if handle.wants_keys(index, x.shape[1]) else None
    x = handle.merge_layer(call, x, metric)
    return handle.end_layer(call, x + block.mlp(block.ln_2(x)))


def _output_hook(
    handle: ToMeHandle, module: nn.Module, args: tuple, output: torch.Tensor
) -> torch.Tensor | None:
    # encoder.ln: its output belongs to the pass of its input (the last block's output).
    handle.follow(output, args[0])
    return handle.unmerge(output) if handle.unmerge_output else None


def apply(model: nn.Module, *, r, **settings) -> ToMeHandle:
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if not isinstance(layers, nn.Sequential) or not isinstance(getattr(encoder, "ln", None), nn.Module):
        raise TypeError(
            "tome: expected a torchvision VisionTransformer with .encoder.layers (nn.Sequential) "
            "and .encoder.ln"
        )
    blocks = list(layers)
    for index, block in enumerate(blocks):
        _check_block(index, block)
    handle = KernelHandle(
        len(blocks),
        r,
        protected=1,  # the class token
        **settings,
    )
    with handle.installing():
        for index, block in enumerate(blocks):
            handle.install_method(block, "forward", _block_forward, index, handle)
        handle.install_hook(encoder.ln, _output_hook, handle)
    return handle


# -- what the tools need -------------------------------------------------------------------------


def _tools_tokens(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = model._process_input(pixels)
    cls = model.class_token.expand(x.shape[0], -1, -1)
    x = model.encoder(torch.cat([cls, x], dim=1))
    return x, model.heads(x[:, 0])


def _tools_input_sizes(model: nn.Module) -> InputSizes:
    size = int(model.image_size)
    return InputSizes(
        fixed=(size, size), why=f"torchvision, built with image_size={size}, which its forward checks"
    )


ADAPTER = Adapter(
    patches=("torchvision.VisionTransformer",),
    apply=apply,
    merged="between attention and MLP in every `EncoderBlock`",
    tested_on="tiny random configs",
    handle=KernelHandle,
    vision=VisionInfo(
        tokens=_tools_tokens,
        pool=lambda model, tokens: tokens[:, 0],
        run=lambda model, pixels: model(pixels),
        blocks=lambda model: list(model.encoder.layers),
        width=lambda model: int(model.hidden_dim),
        default_size=lambda model: int(model.image_size),
        patch_size=lambda model: int(model.patch_size),
        protected=lambda model: 1,
        num_classes=lambda model: int(model.heads[-1].out_features),
        input_sizes=_tools_input_sizes,
    ),
)
