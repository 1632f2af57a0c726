"""Hugging Face text encoders (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, MPNet): merge between
attention and feed-forward in every layer, padding-aware and batch-invariant.

The layers are post-norm: ``x = norm(x + attention(x))``, then ``norm(x + ffn(x))``. Each patched
layer runs its own attention module (with the model's own ``eager``/``sdpa`` attention), merges
its output, and runs its own feed-forward part on the merged tokens. Keys (the matching metric)
are read from the attention's key projection by a forward hook.

Padding: the mask the model builds from ``attention_mask`` marks padding; padding tokens get
size 0, never merge with real tokens and are never attended to, and every row merges its own
real tokens by its own similarities (:func:`tome.core.merge.masked_soft_matching`): a text's output is
the same alone or in any right-padded batch. With ``ratio`` schedules a short text loses few
tokens and a long one many.

Packed sequences (not MPNet, whose encoder passes no extra keywords to its layers): pass
``tome_sequence_ids`` (B, N) int64 document ids (``-100`` at padding) to the model's forward, with ``position_ids`` that restart in every document. Attention is then
block-diagonal (a token attends to its own document only) and merges never cross documents.

The sequence output (``last_hidden_state``) comes back at the original length by default
(``unmerge_output``), so pooling with the ``attention_mask`` works unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from tome.adapters.common.classes import class_names, find_known
from tome.adapters.common.text import (
    DEFAULT_HIDDEN_WEIGHT,
    DEFAULT_MIN_TOKENS,
    PACKED_KEYWORD,
    TEXT_DEFAULTS,
    TextFamily,
    TextHandle,
    begin_text_layer,
    check_attention_mask,
    get_path,
    refuse_outliers,
)
from tome.runtime.handle import BlockCall, ToMeHandle, current_sequence_ids
from tome.runtime.registry import MASKED, Adapter

# The handle, the defaults and the start of a layer call are shared with ModernBERT
# (tome.adapters.common.text); named here too, for the tools and users that read them here.
__all__ = [
    "ADAPTER",
    "DEFAULT_HIDDEN_WEIGHT",
    "DEFAULT_MIN_TOKENS",
    "PACKED_KEYWORD",
    "TEXT_DEFAULTS",
    "TextHandle",
    "apply",
]


_BERT_PARTS = ("attention", "intermediate", "output")  # MPNet too
_DISTIL_PARTS = ("attention", "sa_layer_norm", "ffn", "output_layer_norm")

_BASES = {
    "BertModel": TextFamily(
        "encoder.layer", "BertLayer", "attention.self.key", "attention.self", "bert", "encoder"
    ),
    "RobertaModel": TextFamily(
        "encoder.layer", "RobertaLayer", "attention.self.key", "attention.self", "bert", "encoder"
    ),
    "XLMRobertaModel": TextFamily(
        "encoder.layer", "XLMRobertaLayer", "attention.self.key", "attention.self", "bert", "encoder"
    ),
    "DistilBertModel": TextFamily(
        "transformer.layer", "TransformerBlock", "attention.k_lin", "attention", "distilbert", "transformer"
    ),
    # MPNet adds a relative position bias computed once for the full sequence; merged tokens
    # take the bias of their group's first token.
    "MPNetModel": TextFamily(
        "encoder.layer", "MPNetLayer", "attention.attn.k", "attention.attn", "mpnet", "encoder"
    ),
}


def _find_base(model: nn.Module) -> tuple[nn.Module, TextFamily]:
    found = find_known((model, getattr(model, "base_model", None)), _BASES)
    if found is not None:
        return found
    raise TypeError(
        f"tome: {type(model).__name__} has no text encoder that tome knows; supported: {', '.join(_BASES)}"
    )


def _check_layer(index: int, layer: nn.Module, family: TextFamily) -> None:
    parts = _DISTIL_PARTS if family.kind == "distilbert" else _BERT_PARTS
    missing = [p for p in parts if not isinstance(getattr(layer, p, None), nn.Module)]
    if family.layer_class not in class_names(layer) or missing:
        raise TypeError(
            f"tome: transformers layer {index} is a {type(layer).__name__}"
            f"{' without ' + ', '.join(missing) if missing else ''}; expected a {family.layer_class} with "
            f"parts {', '.join(parts)} (the layer structure of transformers 5)"
        )
    if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False):
        raise TypeError(
            f"tome: transformers layer {index} is a decoder / cross-attention layer; tome merges tokens "
            "in encoders only"
        )
    if not isinstance(get_path(layer, family.key), nn.Linear):
        raise TypeError(f"tome: transformers layer {index} has no key projection `{family.key}` (nn.Linear)")
    if not isinstance(getattr(get_path(layer, family.attention), "attention_head_size", None), int):
        raise TypeError(f"tome: transformers layer {index}: `{family.attention}` has no attention_head_size")


def _packed_mask(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Block-diagonal additive mask ``(B, 1, N, N)``: a token attends to its own document."""
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0)
    return torch.zeros(same.shape, dtype=dtype, device=ids.device).masked_fill(~same, torch.finfo(dtype).min)[
        :, None
    ]


def _layer_mask(
    handle: ToMeHandle, call: BlockCall, attention_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """The attention mask a layer call runs with: the model's own until something merged, then
    the handle's (log size, padding); block-diagonal for packed passes."""
    ids = call.pass_state.sequence_ids
    if ids is not None:
        mask = _packed_mask(current_sequence_ids(call), dtype)
        if call.merged and handle.prop_attn:
            mask = mask + call.history.sizes.clamp_min(1).log().to(dtype)[:, None, None, :]
        return mask
    if not call.merged:
        return attention_mask
    return handle.attention_bias(call, dtype)


def _bert_layer_forward(
    layer: nn.Module,
    index: int,
    handle: TextHandle,
    family: TextFamily,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    if encoder_hidden_states is not None:
        raise ValueError(
            "tome: a patched text encoder layer takes no encoder_hidden_states (cross-attention)"
        )
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    call = begin_text_layer(layer, index, handle, family, hidden_states, attention_mask, kwargs)
    mask = _layer_mask(handle, call, attention_mask, hidden_states.dtype)
    handle.take_keys()  # nothing left over from an interrupted call in this thread
    attention_output = layer.attention(hidden_states, mask, **kwargs)[0]
    x = handle.merge_layer(
        call, attention_output, handle.matching_metric(handle.take_keys(), attention_output)
    )
    return handle.end_layer(call, layer.feed_forward_chunk(x))


def _distilbert_layer_forward(
    layer: nn.Module,
    index: int,
    handle: TextHandle,
    family: TextFamily,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    call = begin_text_layer(layer, index, handle, family, hidden_states, attention_mask, kwargs)
    mask = _layer_mask(handle, call, attention_mask, hidden_states.dtype)
    handle.take_keys()
    attention_output = layer.attention(hidden_states, attention_mask=mask, **kwargs)[0]
    x = layer.sa_layer_norm(attention_output + hidden_states)
    x = handle.merge_layer(call, x, handle.matching_metric(handle.take_keys(), x))
    return handle.end_layer(call, layer.output_layer_norm(layer.ffn(x) + x))


def _mpnet_layer_forward(
    layer: nn.Module,
    index: int,
    handle: TextHandle,
    family: TextFamily,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    output_attentions: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, ...]:
    call = begin_text_layer(layer, index, handle, family, hidden_states, attention_mask, kwargs)
    mask = _layer_mask(handle, call, attention_mask, hidden_states.dtype)
    if position_bias is not None and call.merged:
        position_bias = _group_position_bias(position_bias, call)
    handle.take_keys()
    outputs = layer.attention(hidden_states, mask, position_bias, output_attentions=output_attentions)
    x = handle.merge_layer(call, outputs[0], handle.matching_metric(handle.take_keys(), outputs[0]))
    out = handle.end_layer(call, layer.output(layer.intermediate(x), x))
    return (out, *outputs[1:])


def _group_position_bias(bias: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """The ``(B, heads, N0, N0)`` relative position bias of the original tokens, read at each
    merged token's first original token: ``(B, heads, N, N)``."""
    source = call.history.source
    B, N0 = source.shape
    N = call.history.sizes.shape[1]
    first = torch.full((B, N), N0 - 1, dtype=source.dtype, device=source.device)
    first = first.scatter_reduce(1, source, torch.arange(N0, device=source.device).expand(B, N0), "amin")
    bias = bias.expand(B, -1, -1, -1)
    heads = bias.shape[1]
    rows = bias.gather(2, first[:, None, :, None].expand(B, heads, N, N0))
    return rows.gather(3, first[:, None, None, :].expand(B, heads, N, N))


def _key_hook(
    index: int, handle: ToMeHandle, head_dim: int, module: nn.Module, args: tuple, output: torch.Tensor
) -> None:
    handle.offer_keys(index, output.unflatten(-1, (-1, head_dim)))


def _output_hook(handle: ToMeHandle, module: nn.Module, args: tuple, output):
    # The encoder's output: its last_hidden_state is the last layer's output (of this pass).
    tokens = output.get("last_hidden_state") if isinstance(output, Mapping) else output
    if isinstance(tokens, tuple) and tokens and isinstance(tokens[0], torch.Tensor):
        tokens = tokens[0]
    if not isinstance(tokens, torch.Tensor) or not handle.unmerge_output:
        return None
    if not torch.compiler.is_compiling() and handle.history_of(tokens) is None:
        return None  # not the output of a pass of this model
    unmerged = handle.unmerge(tokens)
    if isinstance(output, torch.Tensor):
        return unmerged
    if isinstance(output, Mapping):
        output["last_hidden_state"] = unmerged
        return output
    return (unmerged, *output[1:])


def apply(model: nn.Module, *, r, **settings) -> ToMeHandle:
    # Post-norm layers: every token leaves LayerNorm with (almost) the same norm, so "the largest
    # norms" would be picked by float rounding (and differ between batches).
    refuse_outliers(
        settings,
        "their layers are post-norm, so every token's hidden state has nearly the same norm and no "
        "outliers to keep",
    )
    base, family = _find_base(model)
    layers = list(get_path(base, family.layers) or [])
    if not layers:
        raise TypeError(f"tome: this transformers version's {type(base).__name__} has no `{family.layers}`")
    for index, layer in enumerate(layers):
        _check_layer(index, layer, family)
    output_module = get_path(base, family.output)
    handle = TextHandle(len(layers), r, protected=1, **settings)  # [CLS] / <s> stays in front
    forward = {
        "bert": _bert_layer_forward,
        "distilbert": _distilbert_layer_forward,
        "mpnet": _mpnet_layer_forward,
    }[family.kind]
    with handle.installing():
        for index, layer in enumerate(layers):
            head_dim = get_path(layer, family.attention).attention_head_size
            handle.install_hook(get_path(layer, family.key), _key_hook, index, handle, head_dim)
            handle.install_method(layer, "forward", forward, index, handle, family)
        handle.install_hook(output_module, _output_hook, handle)
        handle.install_pre_hook(base, check_attention_mask, handle)
    return handle


ADAPTER = Adapter(
    patches=(
        "transformers.BertModel",
        "transformers.BertForSequenceClassification",
        "transformers.RobertaModel",
        "transformers.RobertaForSequenceClassification",
        "transformers.XLMRobertaModel",
        "transformers.XLMRobertaForSequenceClassification",
        "transformers.DistilBertModel",
        "transformers.DistilBertForSequenceClassification",
        "transformers.MPNetModel",
        "transformers.MPNetForSequenceClassification",
    ),
    apply=apply,
    kind=MASKED,
    handle=TextHandle,
    title="text encoders (transformers BERT-family, ModernBERT, sentence-transformers)",
    merged="between attention and feed-forward; each row merges its own real tokens, padding changes none of them",
    tested_on="tiny random configs; real all-MiniLM-L6-v2 (sentence-transformers)",
    defaults=TEXT_DEFAULTS,
)
