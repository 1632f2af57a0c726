"""Hugging Face transformers vision transformers: merge between attention and MLP in every
encoder layer.

Supported backbones (the task models around them are found through ``base_model`` or
``vision_model``): ViT, DINOv2 (with registers, and their ``*Backbone`` feature-map models),
CLIP vision (also inside ``CLIPModel``, where the text tower is left alone), SigLIP / SigLIP2
vision (also inside ``SiglipModel`` / ``Siglip2Model``), VideoMAE (video tubelets), AST (audio
spectrograms) and ViT-MAE.

Each layer is re-composed from its own submodules (norms, attention, LayerScale, drop-path or
dropout, MLP), so the parts run as the installed transformers version built them. The attention
module keeps its own attention interface (``eager``, ``sdpa``); proportional attention goes in as
its additive float ``attention_mask``. VideoMAE's self-attention takes no mask: its instance gets a
forward that passes one to the same attention interface (and runs the class's own forward when
there is none). Keys (the matching metric) are read from the key projection by a forward hook:
nothing is computed twice.

The protected leading tokens (never merged) are the class token, DINOv2's registers, and AST's
class and distillation tokens; SigLIP and VideoMAE have none.

The sequence output comes back at the original length (``unmerge_output``, and always when the
model's head averages the patch tokens, as ``Dinov2ForImageClassification`` does) through a forward
hook on the module that produces it: the final norm (ViT, DINOv2, SigLIP, AST, ViT-MAE) or the
encoder (CLIP, whose ``post_layernorm`` only reads the class token; VideoMAE, whose final norm is
optional). SigLIP's attention-pooling ``head`` always reads the tokens at the original length, so
that every original patch weighs once (what proportional attention would give it). ``*Backbone``
models unmerge every hidden state their encoder returns with its own layer's merges, before they
are normed and reshaped into feature maps.

Masks: a mask the model builds (from ``attention_mask``, or SigLIP2's ``pixel_attention_mask`` of a
NaFlex batch) marks padding, which never merges with real patches and is never attended to; every
image merges its own patches by its own similarities, so its result does not depend on the rest
of its batch.

Per-layer outputs requested with ``output_hidden_states`` (other than a backbone's) have the merged
length of their layer (``model.tome.unmerge(hidden_state)`` brings any of them back to the original
length); ``output_attentions=True`` (eager attention) gives each layer's attention over its merged
tokens.

ViT-MAE draws its random masking before the encoder (``mask_ratio`` of the patches are dropped, the
rest shuffled, even at ``mask_ratio=0`` unless ``noise`` is given): tokens merge among the patches
the encoder receives, and the unmerged output has the model's own length and order, so ``mask`` and
``ids_restore`` keep their meaning.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn as nn

from tome.adapters.common.classes import class_names, find_known
from tome.core import merge as M
from tome.core import temporal as TM
from tome.runtime.handle import BlockCall, ToMeHandle
from tome.runtime.options import Option
from tome.runtime.registry import Adapter, InputSizes, VisionInfo, pair

# Attention implementations that take an additive float mask of shape (B, 1, 1, N).
_BIAS_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class _Layout:
    """Attribute names of one layer kind's parts, in the order a pre-norm layer runs them:
    ``x + drop1(ls1(attn(norm1(x))))``, then ``x + drop2(ls2(mlp(norm2(x))))``. ``None`` is
    the identity. ``attn_tuple``: the attention returns ``(output, weights)`` (else the output).
    ``mlp_out``: a last MLP part called as ``mlp_out(hidden, x)`` that adds the residual ``x``
    itself (VideoMAE's ``output``); ``ls2`` and ``drop2`` are then unused."""

    norm1: str
    attn: str
    ls1: str | None
    drop1: str | None
    norm2: str
    mlp: str
    ls2: str | None
    drop2: str | None
    attn_tuple: bool = True
    mlp_out: str | None = None

    def parts(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), str)]


_VIT = _Layout("layernorm_before", "attention", None, "dropout", "layernorm_after", "mlp", None, "dropout")
_DINOV2 = _Layout(
    "norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2", "drop_path"
)
_CLIP = _Layout("layer_norm1", "self_attn", None, None, "layer_norm2", "mlp", None, None)
_VIDEOMAE = _Layout(
    "layernorm_before", "attention", None, None, "layernorm_after", "intermediate", None, None,
    attn_tuple=False, mlp_out="output",
)  # fmt: skip


@dataclass(frozen=True)
class _Attention:
    """A layer's attention part: its class, the dotted paths (from it) to the key projection and
    to the module with ``config`` and the head size, and that head size's attribute name.
    ``masked``: that module's own forward takes no attention mask; tome gives its instance one
    that does (:func:`_masked_self_attention`)."""

    cls: str
    key: str = "k_proj"
    core: str = ""
    head_dim: str = "head_dim"
    masked: bool = False


_VIDEOMAE_ATTENTION = _Attention(
    "VideoMAEAttention", key="attention.key", core="attention", head_dim="attention_head_size", masked=True
)
# What the masked forward needs of the self-attention module (VideoMAESelfAttention).
_MASKED_PARTS = ("query", "key", "value")
_MASKED_ATTRIBUTES = ("attention_head_size", "scaling", "dropout_prob", "config")


@dataclass(frozen=True)
class _Family:
    layers: str  # dotted path from the backbone to its ModuleList of layers
    layer_class: str
    attention: _Attention
    layout: _Layout
    output: str  # the module whose output is the sequence output (last_hidden_state)
    protected: int = 1  # leading tokens never merged (plus config.num_register_tokens)
    head: str | None = None  # an attention-pooling head that reads every original token
    backbone: bool = False  # a *Backbone: its encoder's hidden states become feature maps
    video: bool = False  # tokens are tubelets (t, h, w) of a fixed grid: the temporal option applies


def _vit_like(layers: str, prefix: str, layout: _Layout = _VIT, **kwargs) -> _Family:
    return _Family(layers, f"{prefix}Layer", _Attention(f"{prefix}Attention"), layout, "layernorm", **kwargs)


_BACKBONES = {
    "ViTModel": _vit_like("layers", "ViT"),
    "Dinov2Model": _vit_like("encoder.layer", "Dinov2", _DINOV2),
    "Dinov2WithRegistersModel": _vit_like("encoder.layer", "Dinov2WithRegisters", _DINOV2),
    "Dinov2Backbone": _Family(
        "encoder.layer", "Dinov2Layer", _Attention("Dinov2Attention"), _DINOV2, "encoder", backbone=True
    ),
    "Dinov2WithRegistersBackbone": _Family(
        "encoder.layer",
        "Dinov2WithRegistersLayer",
        _Attention("Dinov2WithRegistersAttention"),
        _DINOV2,
        "encoder",
        backbone=True,
    ),
    "CLIPVisionModel": _Family(
        "encoder.layers", "CLIPEncoderLayer", _Attention("CLIPAttention"), _CLIP, "encoder"
    ),
    "SiglipVisionModel": _Family(
        "encoder.layers",
        "SiglipEncoderLayer",
        _Attention("SiglipAttention"),
        _CLIP,
        "post_layernorm",
        protected=0,
        head="head",
    ),
    "Siglip2VisionModel": _Family(
        "encoder.layers",
        "Siglip2EncoderLayer",
        _Attention("Siglip2Attention"),
        _CLIP,
        "post_layernorm",
        protected=0,
        head="head",
    ),
    "VideoMAEModel": _Family(
        "encoder.layer", "VideoMAELayer", _VIDEOMAE_ATTENTION, _VIDEOMAE, "encoder", protected=0, video=True
    ),
    "ASTModel": _vit_like("layers", "AST", protected=2),  # class and distillation tokens
    "ViTMAEModel": _vit_like("layers", "ViTMAE"),
}

# Heads that read more than the protected tokens of the sequence output (a mean over the patch
# tokens): for them the sequence output is always unmerged, so that every original token counts
# once (the size-weighted mean of the merged tokens).
_POOLING_HEADS = (
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersForImageClassification",
    "CLIPForImageClassification",
    "SiglipForImageClassification",
    "Siglip2ForImageClassification",
    "VideoMAEForVideoClassification",  # a mean over the tokens (or token 0, a patch: no class token)
)


def _find_backbone(model: nn.Module) -> tuple[nn.Module, _Family]:
    # The model itself (ViTModel, ...) or the base model inside a task model (model.vit, ...), or
    # the vision tower of a two-tower model (CLIPModel.vision_model, ...).
    candidates = (model, getattr(model, "base_model", None), getattr(model, "vision_model", None))
    found = find_known(candidates, _BACKBONES)
    if found is not None:
        return found
    raise TypeError(
        f"tome: {type(model).__name__} has no vision transformer backbone that tome knows; "
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


def _find(module: nn.Module, path: str) -> object:
    for name in filter(None, path.split(".")):
        module = getattr(module, name, None)
    return module


def _core(attn: nn.Module, spec: _Attention) -> nn.Module:
    return _find(attn, spec.core) if spec.core else attn


def _check_layer(index: int, layer: nn.Module, family: _Family) -> None:
    layout, spec = family.layout, family.attention
    parts = layout.parts()
    missing = [p for p in parts if not isinstance(getattr(layer, p, None), nn.Module)]
    if family.layer_class not in class_names(layer) or missing:
        raise TypeError(
            f"tome: transformers layer {index} is a {type(layer).__name__}"
            f"{' without ' + ', '.join(missing) if missing else ''}; expected a {family.layer_class} "
            f"with parts {', '.join(parts)} (the layer structure of transformers 5)"
        )
    attn = getattr(layer, layout.attn)
    core = _core(attn, spec)
    wanted = f"a {spec.cls} with a {spec.key} Linear and {spec.head_dim}"
    ok = (
        spec.cls in class_names(attn)
        and isinstance(core, nn.Module)
        and isinstance(_find(attn, spec.key), nn.Linear)
        and isinstance(getattr(core, spec.head_dim, None), int)
        and hasattr(core, "config")
    )
    if ok and spec.masked:
        wanted += f" (its `{spec.core}` with {', '.join(_MASKED_PARTS + _MASKED_ATTRIBUTES)})"
        ok = all(isinstance(getattr(core, p, None), nn.Linear) for p in _MASKED_PARTS) and all(
            hasattr(core, a) for a in _MASKED_ATTRIBUTES
        )
        modeling = sys.modules.get(type(core).__module__)
        ok = ok and all(
            hasattr(modeling, name) for name in ("ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")
        )
    if not ok:
        raise TypeError(
            f"tome: transformers layer {index} ({type(layer).__name__}) uses attention "
            f"{type(attn).__name__}; expected {wanted} (transformers 5)"
        )


def _proportional_bias(
    handle: ToMeHandle, call: BlockCall, config: object, dtype: torch.dtype
) -> torch.Tensor | None:
    bias = handle.attention_bias(call, dtype)
    if bias is not None:
        implementation = getattr(config, "_attn_implementation", None) or "eager"
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
    family: _Family,
    call: BlockCall,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    layout = family.layout
    attn = getattr(layer, layout.attn)
    if attention_mask is None or call.merged:
        # Once tokens are merged the model's mask no longer fits: the handle's mask (log size,
        # and the padding of the pass, merged the same way) replaces it.
        config = _core(attn, family.attention).config
        attention_mask = _proportional_bias(handle, call, config, hidden_states.dtype)
    normed = getattr(layer, layout.norm1)(hidden_states)
    handle.take_keys()  # nothing left over from an interrupted call in this thread
    attn_out = attn(normed, attention_mask=attention_mask, **kwargs)
    if layout.attn_tuple:
        attn_out = attn_out[0]
    x = hidden_states + _branch(layer, (layout.ls1, layout.drop1), attn_out)
    x = handle.merge_layer(call, x, handle.take_keys())
    mlp_out = getattr(layer, layout.mlp)(getattr(layer, layout.norm2)(x))
    if layout.mlp_out is not None:
        return handle.end_layer(call, getattr(layer, layout.mlp_out)(mlp_out, x))
    return handle.end_layer(call, x + _branch(layer, (layout.ls2, layout.drop2), mlp_out))


def _layer_forward(
    layer: nn.Module,
    index: int,
    handle: ToMeHandle,
    family: _Family,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    key_mask = None
    if attention_mask is not None and index == 0:
        # The mask transformers builds for the model (from a user (B, N) attention_mask, SigLIP2's
        # pixel_attention_mask, or an all-ones one while torch.export traces): padding never
        # merges with real tokens.
        if attention_mask.dim() != 4 or attention_mask.shape[-1] != hidden_states.shape[1]:
            raise ValueError(
                f"tome: a patched transformers layer expects a (B, 1, N, N) attention mask, got "
                f"{tuple(attention_mask.shape)} for {hidden_states.shape[1]} tokens"
            )
        key_mask = handle.key_mask_from(attention_mask)
    # The pass is found once, outside gradient checkpointing: a recomputed layer merges exactly
    # as in its forward pass, even if another pass ran in between.
    call = handle.begin_layer(index, hidden_states, key_mask=key_mask)
    function = partial(_layer_body, layer, handle, family, call, **kwargs)
    if getattr(layer, "gradient_checkpointing", False) and layer.training:
        # The class's own forward checkpoints itself (transformers' GradientCheckpointingLayer);
        # this instance forward shadows it, so it checkpoints in the same way.
        return layer._gradient_checkpointing_func(function, hidden_states, attention_mask)
    return function(hidden_states, attention_mask)


def _masked_self_attention(
    module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
):
    """Forward of a self-attention module whose class takes no mask (VideoMAE): without a mask,
    the class's own forward; with one, the same projections and attention interface, with the
    mask (proportional attention, padding)."""
    if attention_mask is None:
        return type(module).forward(module, hidden_states, **kwargs)
    modeling = sys.modules[type(module).__module__]
    interface = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, modeling.eager_attention_forward
    )
    input_shape = hidden_states.shape[:-1]
    shape = (*input_shape, -1, module.attention_head_size)
    keys = module.key(hidden_states).view(shape).transpose(1, 2)
    values = module.value(hidden_states).view(shape).transpose(1, 2)
    queries = module.query(hidden_states).view(shape).transpose(1, 2)
    context, probs = interface(
        module,
        queries,
        keys,
        values,
        attention_mask,
        is_causal=getattr(module, "is_causal", False),
        scaling=module.scaling,
        dropout=0.0 if not module.training else module.dropout_prob,
    )
    return context.reshape(*input_shape, -1), probs


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


def _head_pre_hook(handle: ToMeHandle, module: nn.Module, args: tuple, kwargs: dict):
    # An attention-pooling head (SigLIP): it attends over every original token, each once (its
    # own attention mask, SigLIP2's pixel_attention_mask, has the original length too).
    tokens = args[0] if args else kwargs.get("hidden_state")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        return None
    if not torch.compiler.is_compiling() and handle.history_of(tokens) is None:
        return None  # already at the original length, or not from a pass of this model
    unmerged = handle.unmerge(tokens)
    if unmerged is tokens:
        return None
    if args:
        return (unmerged, *args[1:]), kwargs
    return args, {**kwargs, "hidden_state": unmerged}


def _backbone_hook(handle: ToMeHandle, module: nn.Module, args: tuple, output):
    # A *Backbone's encoder: hidden_states[0] is the embedding output, hidden_states[i] the output
    # of layer i - 1. Each is unmerged with the merges of its own layer before the backbone norms
    # it and reshapes it into a feature map.
    states = output.get("hidden_states") if isinstance(output, Mapping) else None
    if not states:
        return None
    unmerged = []
    for position, hidden in enumerate(states):
        history = None
        if isinstance(hidden, torch.Tensor) and position >= 1:
            history = handle.history_of(hidden, block=position - 1)
        if (
            history is not None
            and tuple(hidden.shape[:2]) == tuple(history.sizes.shape)
            and history.num_tokens != history.num_original
        ):
            hidden = M.unmerge(history.source, hidden)
        unmerged.append(hidden)
    output["hidden_states"] = tuple(unmerged)
    return output


# -- the temporal option (VideoMAE) -------------------------------------------------------------


def _temporal_value(name: str, value: object) -> object:
    # Not one_of: 1 == True and 0 == False would pass as members.
    if not (isinstance(value, bool) or value == "window"):
        raise ValueError(
            f"{name}: expected False, True (own place) or 'window' (3 x 3 places), got {value!r}"
        )
    return value


class _VideoOnly(Option):
    """An option that only a handle with a tubelet grid (VideoMAE) may turn on: the value is
    checked, then refused on an image model's handle, naming the model."""

    def __set__(self, obj, value) -> None:
        value = self.check(self.name, value)
        if value is not False and getattr(obj, "video_grid", None) is None:
            raise ValueError(
                f"{self.name}: merging across time slices needs a video encoder (VideoMAE); "
                f"{getattr(obj, 'model_class', 'this model')} reads images, so {self.name} must be "
                f"False, got {value!r}"
            )
        obj.__dict__["_" + self.name] = value


class VisionHandle(ToMeHandle):
    """The handle of a patched transformers vision model: :class:`ToMeHandle` plus, for VideoMAE,
    the ``temporal`` option (:mod:`tome.core.temporal`). ``video_grid``: ``(T, H, W)``, the time
    slices and places of the model's tubelets (``None`` for image models)."""

    temporal = _VideoOnly(
        False,
        _temporal_value,
        "VideoMAE: merge each odd time slice's tubelets into the same place of an adjacent slice first",
    )

    def __init__(
        self,
        num_layers: int,
        r,
        *,
        video_grid: tuple[int, int, int] | None = None,
        model_class: str = "",
        **settings,
    ) -> None:
        # Set before the options are (the temporal option reads them).
        self.video_grid = video_grid
        self.model_class = model_class
        super().__init__(num_layers, r, **settings)

    def _plan(
        self, call: BlockCall, x: torch.Tensor, metric: torch.Tensor, r: int, bias: torch.Tensor | None
    ) -> M.MergePlan:
        """:meth:`ToMeHandle._plan`; with ``temporal`` on, the layers of the temporal phase
        (:func:`tome.core.temporal.in_temporal_phase`, decided on token counts alone) merge by
        :func:`tome.core.temporal.temporal_soft_matching`. A pass without the full grid (VideoMAE's
        ``bool_masked_pos``) or with padding merges by the default matching."""
        grid = self.video_grid
        if (
            self.temporal is False
            or grid is None
            or call.valid is not None
            or not TM.in_temporal_phase(x.shape[1], r, call.history.num_original, grid)
        ):
            return super()._plan(call, x, metric, r, bias)
        window = 3 if self.temporal == "window" else 1
        return TM.temporal_soft_matching(
            metric, r, call.history, grid, window, token_bias=bias, normalized=self.unit_metric
        )


def _video_grid(backbone: nn.Module) -> tuple[int, int, int]:
    # VideoMAE's embeddings take exactly config.num_frames frames of config.image_size (its fixed
    # position table has one entry per tubelet), flattened (t, h, w) by its Conv3d.
    config = backbone.config
    height, width = pair(config.image_size)
    patch_h, patch_w = pair(config.patch_size)
    return (int(config.num_frames) // int(config.tubelet_size), height // patch_h, width // patch_w)


def apply(model: nn.Module, *, r, **settings) -> ToMeHandle:
    backbone, family = _find_backbone(model)
    layers = list(_get(backbone, family.layers))
    for index, layer in enumerate(layers):
        _check_layer(index, layer, family)
    output_module = _get(backbone, family.output)
    head = getattr(backbone, family.head, None) if family.head else None
    # Class token (AST: and distillation token), then registers (DINOv2 with registers): never
    # merged, kept in front.
    protected = family.protected + int(getattr(backbone.config, "num_register_tokens", 0) or 0)
    grid = _video_grid(backbone) if family.video else None
    handle = VisionHandle(
        len(layers), r, protected=protected, video_grid=grid, model_class=type(model).__name__, **settings
    )
    always = any(name in _POOLING_HEADS for name in class_names(model))
    spec = family.attention
    with handle.installing():
        for index, layer in enumerate(layers):
            attn = getattr(layer, family.layout.attn)
            core = _core(attn, spec)
            head_dim = getattr(core, spec.head_dim)
            handle.install_hook(_find(attn, spec.key), _key_hook, index, handle, head_dim)
            if spec.masked:
                handle.install_method(core, "forward", _masked_self_attention)
            handle.install_method(layer, "forward", _layer_forward, index, handle, family)
        if family.backbone:
            handle.install_hook(output_module, _backbone_hook, handle)
        else:
            handle.install_hook(output_module, _output_hook, handle, always)
        if isinstance(head, nn.Module):
            handle.install_pre_hook(head, _head_pre_hook, handle)
    return handle


# -- what the tools need (ViT, DINOv2 (with registers), CLIP vision) ---------------------------


def _tools_base(model: nn.Module) -> nn.Module:
    for name in ("vision_model", "dinov2", "vit"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    return model


def _tools_tokens(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    base = _tools_base(model)
    if base is model:
        return model(pixel_values=pixels).last_hidden_state, None
    captured: dict = {}

    def hook(module, args, output):
        captured["x"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    hook_handle = base.register_forward_hook(hook)
    try:
        out = model(pixel_values=pixels)
    finally:
        hook_handle.remove()
    return captured["x"], getattr(out, "logits", None)


def _tools_pool(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    post = getattr(_tools_base(model), "post_layernorm", None)  # CLIP: pooled = post_layernorm(CLS)
    cls = tokens[:, 0]
    return post(cls) if isinstance(post, nn.Module) else cls


def _tools_blocks(model: nn.Module) -> list[nn.Module]:
    base = _tools_base(model)
    for path in ("encoder.layer", "encoder.layers", "layers", "layer"):
        found = _find(base, path)
        if isinstance(found, nn.ModuleList):
            return list(found)
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise TypeError(f"cannot find the transformer blocks of {type(model).__name__}")
    return list(max(lists, key=len))


def _vision_config(model: nn.Module):
    return getattr(model.config, "vision_config", model.config)


def _tools_num_classes(model: nn.Module) -> int:
    if any("ForImageClassification" in name for name in class_names(model)):
        return int(getattr(model.config, "num_labels", 0))
    return 0


def _tools_input_sizes(model: nn.Module) -> InputSizes:
    """DINOv2 (with registers) interpolates its position embeddings in every forward: any
    multiple of the patch size. ViT and CLIP vision take ``config.image_size`` unless called with
    ``interpolate_pos_encoding=True``, which the tools do not do."""
    config = _vision_config(model)
    if str(getattr(config, "model_type", "")).startswith("dinov2"):
        return InputSizes(multiple=int(config.patch_size), why="DINOv2 interpolates its position embeddings")
    fixed = pair(config.image_size)
    return InputSizes(
        fixed=fixed,
        why=f"config.image_size of {type(model).__name__}; other sizes need interpolate_pos_encoding=True",
    )


# The classes the tools (tome bench / eval / viz / tune / embed) run: ViT, DINOv2 (with registers),
# CLIP vision.
_TOOLS_CLASSES = (
    "ViTModel",
    "ViTForImageClassification",
    "Dinov2Model",
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel",
    "Dinov2WithRegistersForImageClassification",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPForImageClassification",
)

VISION = VisionInfo(
    tokens=_tools_tokens,
    pool=_tools_pool,
    run=lambda model, pixels: model(pixel_values=pixels),
    blocks=_tools_blocks,
    width=lambda model: int(_vision_config(model).hidden_size),
    default_size=lambda model: pair(_vision_config(model).image_size)[0],
    patch_size=lambda model: int(_vision_config(model).patch_size),
    protected=lambda model: 1 + int(getattr(_vision_config(model), "num_register_tokens", 0) or 0),
    num_classes=_tools_num_classes,
    input_sizes=_tools_input_sizes,
    classes=_TOOLS_CLASSES,
)

ADAPTER = Adapter(
    patches=tuple(
        f"transformers.{name}"
        for name in (
            *_TOOLS_CLASSES,
            "CLIPModel",
            "SiglipVisionModel",
            "SiglipModel",
            "SiglipForImageClassification",
            "Siglip2VisionModel",
            "Siglip2Model",
            "Siglip2ForImageClassification",
            "VideoMAEModel",
            "VideoMAEForVideoClassification",
            "ASTModel",
            "ASTForAudioClassification",
            "ViTMAEModel",
            "Dinov2Backbone",
            "Dinov2WithRegistersBackbone",
        )
    ),
    apply=apply,
    merged="between attention and MLP in every layer; pooling heads size-weighted",
    tested_on="tiny random configs (ViT, DINOv2, CLIP, SigLIP/SigLIP2 with NaFlex padding, VideoMAE, AST, "
    "ViT-MAE, backbones); real DINOv2-S/14",
    vision=VISION,
    handle=VisionHandle,
)
