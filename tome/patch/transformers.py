"""Hugging Face transformers ViT, DINOv2 (with registers) and CLIP vision: merge between
attention and MLP in every encoder layer.

Each layer is re-composed from its own submodules (norms, attention, LayerScale, drop-path or
dropout, MLP), so the parts run as the installed transformers version built them. The attention
module keeps its own attention interface (``eager``, ``sdpa``); proportional attention goes in as
its additive float ``attention_mask``. Keys (the matching metric) are read from the output of
``k_proj`` by a forward hook: nothing is computed twice.

The sequence output comes back at the original length (``unmerge_output``, and always when the
model's head averages the patch tokens, as ``Dinov2ForImageClassification`` does) through a forward
hook on the module that produces it: the final ``layernorm`` (ViT, DINOv2) or the encoder (CLIP,
whose ``post_layernorm`` only reads the class token).

Per-layer outputs requested with ``output_hidden_states`` have the merged length of their layer
(``model.tome.unmerge(hidden_state)`` brings any of them back to the original length);
``output_attentions=True`` (eager attention) gives each layer's attention over its merged tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from tome.patch.handle import BlockCall, ToMeHandle

# Attention implementations that take an additive float mask of shape (B, 1, 1, N).
_BIAS_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class _Layout:
    """Attribute names of one layer kind's parts, in the order a pre-norm layer runs them:
    ``x + drop1(ls1(attn(norm1(x))))``, then ``x + drop2(ls2(mlp(norm2(x))))``. ``None`` is
    the identity."""

    norm1: str
    attn: str
    ls1: str | None
    drop1: str | None
    norm2: str
    mlp: str
    ls2: str | None
    drop2: str | None


_VIT = _Layout("layernorm_before", "attention", None, "dropout", "layernorm_after", "mlp", None, "dropout")
_DINOV2 = _Layout(
    "norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2", "drop_path"
)
_CLIP = _Layout("layer_norm1", "self_attn", None, None, "layer_norm2", "mlp", None, None)


@dataclass(frozen=True)
class _Family:
    layers: str  # dotted path from the backbone to its ModuleList of layers
    layer_class: str
    attention_class: str
    layout: _Layout
    output: str  # the module whose output is the sequence output (last_hidden_state)


_BACKBONES = {
    "ViTModel": _Family("layers", "ViTLayer", "ViTAttention", _VIT, "layernorm"),
    "Dinov2Model": _Family("encoder.layer", "Dinov2Layer", "Dinov2Attention", _DINOV2, "layernorm"),
    "Dinov2WithRegistersModel": _Family(
        "encoder.layer", "Dinov2WithRegistersLayer", "Dinov2WithRegistersAttention", _DINOV2, "layernorm"
    ),
    "CLIPVisionModel": _Family("encoder.layers", "CLIPEncoderLayer", "CLIPAttention", _CLIP, "encoder"),
}

# Heads that read more than the class token of the sequence output (a mean over the patch
# tokens): for them the sequence output is always unmerged, so that every original token counts
# once (the size-weighted mean of the merged tokens).
_POOLING_HEADS = (
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersForImageClassification",
    "CLIPForImageClassification",
)


def _class_names(obj: object) -> list[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def _find_backbone(model: nn.Module) -> tuple[nn.Module, _Family]:
    # The model itself (ViTModel, ...) or the base model inside a task model (model.vit, ...).
    for candidate in (model, getattr(model, "base_model", None), getattr(model, "vision_model", None)):
        if isinstance(candidate, nn.Module):
            for name in _class_names(candidate):
                if name in _BACKBONES:
                    return candidate, _BACKBONES[name]
    raise TypeError(
        f"tome: {type(model).__name__} has no ViT, DINOv2 or CLIP vision backbone that tome knows; "
        f"supported backbones: {', '.join(_BACKBONES)}"
    )


def _get(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            raise TypeError(
                f"tome: this transformers version's model has no `{path}`; the transformers adapter "
                "supports the layer structure of transformers 5"
            )
    return module


def _check_layer(index: int, layer: nn.Module, family: _Family) -> None:
    layout = family.layout
    parts = [p for p in vars(layout).values() if p is not None]
    if family.layer_class not in _class_names(layer) or not all(
        isinstance(getattr(layer, p, None), nn.Module) for p in parts
    ):
        raise TypeError(
            f"tome: transformers layer {index} is a {type(layer).__name__}; expected a "
            f"{family.layer_class} with parts {', '.join(parts)} (the layer structure of transformers 5)"
        )
    attn = getattr(layer, layout.attn)
    if (
        family.attention_class not in _class_names(attn)
        or not isinstance(getattr(attn, "k_proj", None), nn.Linear)
        or not isinstance(getattr(attn, "head_dim", None), int)
        or not hasattr(attn, "config")
    ):
        raise TypeError(
            f"tome: transformers layer {index} uses attention {type(attn).__name__}; expected a "
            f"{family.attention_class} with a k_proj Linear and head_dim (transformers 5)"
        )


def _proportional_bias(
    handle: ToMeHandle, call: BlockCall, attn: nn.Module, dtype: torch.dtype
) -> torch.Tensor | None:
    bias = handle.attention_bias(call, dtype)
    if bias is not None:
        implementation = getattr(attn.config, "_attn_implementation", None) or "eager"
        if implementation not in _BIAS_IMPLEMENTATIONS:
            raise ValueError(
                f"tome: proportional attention needs an additive float attention mask, which "
                f"attn_implementation={implementation!r} does not take; use "
                "model.set_attn_implementation('sdpa') (or 'eager'), or patch with prop_attn=False"
            )
    return bias


def _branch(layer: nn.Module, names: tuple[str | None, ...], x: torch.Tensor) -> torch.Tensor:
    for name in names:
        if name is not None:
            x = getattr(layer, name)(x)
    return x


def _layer_body(
    layer: nn.Module,
    handle: ToMeHandle,
    layout: _Layout,
    call: BlockCall,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    attn = getattr(layer, layout.attn)
    if attention_mask is None or call.merged:
        # Once tokens are merged the model's mask no longer fits: the handle's mask (log size,
        # and the padding of the pass, merged the same way) replaces it.
        attention_mask = _proportional_bias(handle, call, attn, hidden_states.dtype)
    normed = getattr(layer, layout.norm1)(hidden_states)
    handle.take_keys()  # nothing left over from an interrupted call in this thread
    attn_out = attn(normed, attention_mask=attention_mask, **kwargs)[0]
    x = hidden_states + _branch(layer, (layout.ls1, layout.drop1), attn_out)
    x = handle.merge_layer(call, x, handle.take_keys())
    mlp_out = getattr(layer, layout.mlp)(getattr(layer, layout.norm2)(x))
    return handle.end_layer(call, x + _branch(layer, (layout.ls2, layout.drop2), mlp_out))


def _layer_forward(
    layer: nn.Module,
    index: int,
    handle: ToMeHandle,
    layout: _Layout,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    key_mask = None
    if attention_mask is not None and index == 0:
        # The mask transformers builds for the model (from a user (B, N) attention_mask, or an
        # all-ones one while torch.export traces): padding never merges with real tokens.
        if attention_mask.dim() != 4 or attention_mask.shape[-1] != hidden_states.shape[1]:
            raise ValueError(
                f"tome: a patched transformers layer expects a (B, 1, N, N) attention mask, got "
                f"{tuple(attention_mask.shape)} for {hidden_states.shape[1]} tokens"
            )
        key_mask = handle.key_mask_from(attention_mask)
    # The pass is found once, outside gradient checkpointing: a recomputed layer merges exactly
    # as in its forward pass, even if another pass ran in between.
    call = handle.begin_layer(index, hidden_states, key_mask=key_mask)
    function = partial(_layer_body, layer, handle, layout, call, **kwargs)
    if getattr(layer, "gradient_checkpointing", False) and layer.training:
        # The class's own forward checkpoints itself (transformers' GradientCheckpointingLayer);
        # this instance forward shadows it, so it checkpoints in the same way.
        return layer._gradient_checkpointing_func(function, hidden_states, attention_mask)
    return function(hidden_states, attention_mask)


def _key_hook(
    index: int, handle: ToMeHandle, head_dim: int, module: nn.Module, args: tuple, output: torch.Tensor
) -> None:
    # (B, N, heads * head_dim) -> the matching metric of the layer running in this thread.
    handle.offer_keys(index, output.unflatten(-1, (-1, head_dim)))


def _output_hook(handle: ToMeHandle, always: bool, module: nn.Module, args: tuple, output):
    # The sequence output belongs to the pass of the last layer's output.
    tokens = output.get("last_hidden_state") if isinstance(output, Mapping) else output
    if isinstance(tokens, tuple) and tokens and isinstance(tokens[0], torch.Tensor):
        tokens = tokens[0]
    if not isinstance(tokens, torch.Tensor):
        return None
    if args and isinstance(args[0], torch.Tensor):
        handle.follow(tokens, args[0])
    if not (always or handle.unmerge_output):
        return None
    history = handle.history_of(tokens) if not torch.compiler.is_compiling() else None
    if history is None and not torch.compiler.is_compiling():
        return None  # not the output of a pass of this model (e.g. a direct call)
    unmerged = handle.unmerge(tokens)
    if isinstance(output, torch.Tensor):
        return unmerged
    if isinstance(output, Mapping):  # a ModelOutput
        output["last_hidden_state"] = unmerged
        return output
    return (unmerged, *output[1:])


def apply(model: nn.Module, *, r, **settings) -> ToMeHandle:
    backbone, family = _find_backbone(model)
    layers = list(_get(backbone, family.layers))
    for index, layer in enumerate(layers):
        _check_layer(index, layer, family)
    output_module = _get(backbone, family.output)
    # Class token, then registers (DINOv2 with registers): never merged, kept in front.
    protected = 1 + int(getattr(backbone.config, "num_register_tokens", 0) or 0)
    handle = ToMeHandle(
        len(layers),
        r,
        protected=protected,
        **settings,
    )
    always = any(name in _POOLING_HEADS for name in _class_names(model))
    with handle.installing():
        for index, layer in enumerate(layers):
            attn = getattr(layer, family.layout.attn)
            handle.install_hook(attn.k_proj, _key_hook, index, handle, attn.head_dim)
            handle.install_method(layer, "forward", _layer_forward, index, handle, family.layout)
        handle.install_hook(output_module, _output_hook, handle, always)
    return handle
