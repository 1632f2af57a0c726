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
from dataclasses import dataclass

import torch
import torch.nn as nn

from tome.core import merge as M
from tome.runtime.handle import BlockCall, ToMeHandle
from tome.runtime.options import Option, at_least, number_in
from tome.runtime.registry import MASKED, Adapter

_BIAS_IMPLEMENTATIONS = ("eager", "sdpa")
# Text encoders' defaults of the shared options. unmerge_output: pooling reads every token with
# the attention mask, so the sequence output comes back at the original length unless the user
# asks otherwise. metric: on all-MiniLM-L6-v2 at ratio 0.1, per-head key similarity kept the
# embedding cosine at 0.986 against 0.970 for head-averaged keys (held-out paragraphs,
# benchmarks/text.py).
TEXT_DEFAULTS = {"unmerge_output": True, "metric": "head_keys"}
DEFAULT_METRIC = TEXT_DEFAULTS["metric"]  # TODO(cli): read from the registry
ADAPTER_OPTIONS = ("min_tokens", "hidden_weight")  # TODO(cli): read from the registry
PACKED_KEYWORD = "tome_sequence_ids"
# The text adapters' own options (TextHandle). Defaults: the best measured on the tuning halves
# of WikiText-2 / STS-2015 on all-MiniLM-L6-v2 (benchmarks/experiments); held-out figures in
# benchmarks/text.py and docs/text.md.
DEFAULT_MIN_TOKENS = 24
DEFAULT_HIDDEN_WEIGHT = 0.5


class TextHandle(ToMeHandle):
    """The handle of a patched text encoder: :class:`ToMeHandle` plus two settings (declared
    options: ``tome.patch`` keywords, settable here)."""

    unit_metric = True

    min_tokens = Option(
        DEFAULT_MIN_TOKENS,
        at_least(0),
        "a row (a text) is never merged below this many tokens: short texts stay whole, long ones "
        "merge by the schedule (depends on the row alone: batch invariance holds)",
        flag="--min-tokens",
    )
    hidden_weight = Option(
        DEFAULT_HIDDEN_WEIGHT,
        number_in(0, 1),
        "the share w of the hidden states in the matching similarity: (1 - w) cos(keys) + "
        "w cos(hidden states); 0: keys only, as ToMe",
        flag="--hidden-weight",
    )

    def _floor(self, removed: int, num_tokens: int) -> int:
        return max(0, min(removed, num_tokens - self._min_tokens))

    def _removed(self, index: int, num_tokens: int) -> int:
        return self._floor(super()._removed(index, num_tokens), num_tokens)

    def layer_r(self, index: int, num_tokens: int) -> int:
        if self._floor(num_tokens, num_tokens) < ToMeHandle._removed(self, index, num_tokens):
            return self._removed(index, num_tokens)  # the floor, not the cap: no cap warning
        return super().layer_r(index, num_tokens)

    def rows_removed(self, index: int, valid_tokens: torch.Tensor) -> torch.Tensor:
        wanted = super().rows_removed(index, valid_tokens)
        return torch.minimum(wanted, (valid_tokens - self._min_tokens).clamp_min(0))

    def matching_metric(self, keys: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
        """The merge metric of a block from its keys' features (:meth:`take_keys`) and the
        hidden states ``(B, N, C)`` it merges: both normalized and concatenated with weights
        ``sqrt(1 - w)`` and ``sqrt(w)``, so its cosine is the weighted sum of theirs. Unit-norm
        (:attr:`unit_metric`): one float32 buffer, which matching reads without another copy."""
        if keys is None:
            return None
        w = self._hidden_weight
        if w == 0:
            return M.unit_features([keys], [1.0])
        if w == 1:
            return M.unit_features([hidden], [1.0])
        return M.unit_features([keys, hidden], [1 - w, w])


@dataclass(frozen=True)
class _TextFamily:
    layers: str  # dotted path from the base model to its ModuleList of layers
    layer_class: str
    key: str  # dotted path from a layer to its key projection (nn.Linear)
    attention: str  # dotted path from a layer to the module with the head size
    kind: str  # "bert": attention -> feed_forward_chunk; "distilbert": attention, norms, ffn
    output: str  # the module whose output is the sequence output


_BERT_PARTS = ("attention", "intermediate", "output")  # MPNet too
_DISTIL_PARTS = ("attention", "sa_layer_norm", "ffn", "output_layer_norm")

_BASES = {
    "BertModel": _TextFamily(
        "encoder.layer", "BertLayer", "attention.self.key", "attention.self", "bert", "encoder"
    ),
    "RobertaModel": _TextFamily(
        "encoder.layer", "RobertaLayer", "attention.self.key", "attention.self", "bert", "encoder"
    ),
    "XLMRobertaModel": _TextFamily(
        "encoder.layer", "XLMRobertaLayer", "attention.self.key", "attention.self", "bert", "encoder"
    ),
    "DistilBertModel": _TextFamily(
        "transformer.layer", "TransformerBlock", "attention.k_lin", "attention", "distilbert", "transformer"
    ),
    # MPNet adds a relative position bias computed once for the full sequence; merged tokens
    # take the bias of their group's first token.
    "MPNetModel": _TextFamily(
        "encoder.layer", "MPNetLayer", "attention.attn.k", "attention.attn", "mpnet", "encoder"
    ),
}


def _class_names(obj: object) -> list[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _find_base(model: nn.Module) -> tuple[nn.Module, _TextFamily]:
    for candidate in (model, getattr(model, "base_model", None)):
        if isinstance(candidate, nn.Module):
            for name in _class_names(candidate):
                if name in _BASES:
                    return candidate, _BASES[name]
    raise TypeError(
        f"tome: {type(model).__name__} has no text encoder that tome knows; supported: {', '.join(_BASES)}"
    )


def _check_layer(index: int, layer: nn.Module, family: _TextFamily) -> None:
    parts = _DISTIL_PARTS if family.kind == "distilbert" else _BERT_PARTS
    missing = [p for p in parts if not isinstance(getattr(layer, p, None), nn.Module)]
    if family.layer_class not in _class_names(layer) or missing:
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
    if not isinstance(_get(layer, family.key), nn.Linear):
        raise TypeError(f"tome: transformers layer {index} has no key projection `{family.key}` (nn.Linear)")
    if not isinstance(getattr(_get(layer, family.attention), "attention_head_size", None), int):
        raise TypeError(f"tome: transformers layer {index}: `{family.attention}` has no attention_head_size")


def _packed_mask(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Block-diagonal additive mask ``(B, 1, N, N)``: a token attends to its own document."""
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0)
    return torch.zeros(same.shape, dtype=dtype, device=ids.device).masked_fill(~same, torch.finfo(dtype).min)[
        :, None
    ]


def _check_implementation(layer: nn.Module, family: _TextFamily) -> None:
    config = getattr(_get(layer, family.attention), "config", None)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in _BIAS_IMPLEMENTATIONS:
        raise ValueError(
            f"tome: merged tokens need an additive float attention mask, which attn_implementation="
            f"{implementation!r} does not take; use model.set_attn_implementation('sdpa') (or 'eager')"
        )


def _layer_mask(
    handle: ToMeHandle, call: BlockCall, attention_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """The attention mask a layer call runs with: the model's own until something merged, then
    the handle's (log size, padding); block-diagonal for packed passes."""
    ids = call.pass_state.sequence_ids
    if ids is not None:
        current = ids if not call.merged else _current_ids(ids, call)
        mask = _packed_mask(current, dtype)
        if call.merged and handle.prop_attn:
            mask = mask + call.history.sizes.clamp_min(1).log().to(dtype)[:, None, None, :]
        return mask
    if not call.merged:
        return attention_mask
    return handle.attention_bias(call, dtype)


def _current_ids(ids: torch.Tensor, call: BlockCall) -> torch.Tensor:
    # Tokens merge only within a document: every original token of a group has its id.
    source = call.history.source
    current = torch.full(call.history.sizes.shape, -100, dtype=ids.dtype, device=ids.device)
    return current.scatter(1, source, ids)


def _begin(
    layer: nn.Module,
    index: int,
    handle: ToMeHandle,
    family: _TextFamily,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict,
) -> BlockCall:
    sequence_ids = kwargs.pop(PACKED_KEYWORD, None)
    if index != 0:
        return handle.begin_layer(index, hidden_states)
    if handle.schedules_merges(index) or sequence_ids is not None:
        _check_implementation(layer, family)
    key_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 4 or attention_mask.shape[-1] != hidden_states.shape[1]:
            raise ValueError(
                f"tome: a patched transformers layer expects a (B, 1, N, N) attention mask, got "
                f"{tuple(attention_mask.shape)} for {hidden_states.shape[1]} tokens"
            )
        key_mask = handle.key_mask_from(attention_mask)
    if sequence_ids is not None:
        B, N = hidden_states.shape[:2]
        if not isinstance(sequence_ids, torch.Tensor) or tuple(sequence_ids.shape) != (B, N):
            raise ValueError(
                f"{PACKED_KEYWORD}: expected a ({B}, {N}) integer tensor of document ids, got "
                f"{getattr(sequence_ids, 'shape', type(sequence_ids).__name__)}"
            )
        sequence_ids = sequence_ids.to(hidden_states.device).long()
        real = sequence_ids >= 0
        key_mask = real if key_mask is None else key_mask & real
    call = handle.begin_layer(index, hidden_states, key_mask=key_mask)
    call.pass_state.sequence_ids = sequence_ids
    return call


def _bert_layer_forward(
    layer: nn.Module,
    index: int,
    handle: TextHandle,
    family: _TextFamily,
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
    call = _begin(layer, index, handle, family, hidden_states, attention_mask, kwargs)
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
    family: _TextFamily,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    call = _begin(layer, index, handle, family, hidden_states, attention_mask, kwargs)
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
    family: _TextFamily,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    output_attentions: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, ...]:
    call = _begin(layer, index, handle, family, hidden_states, attention_mask, kwargs)
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


def _check_attention_mask(handle: ToMeHandle, module: nn.Module, args: tuple, kwargs: dict) -> None:
    # A mask of 0.5 or 2 would be read as "attend" by some paths and not others: refuse it.
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    checkable = isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.dtype != torch.bool
    if checkable and not torch.compiler.is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            "attention_mask: expected 0/1 (or bool) values, 1 for real tokens and 0 for padding; got "
            f"values {sorted(set(mask.unique().tolist()))[:6]}"
        )
    return None


def apply(model: nn.Module, *, r, **settings) -> ToMeHandle:
    options = settings.get("options")
    if options is not None and options.keep_outliers:
        # Post-norm layers: every token leaves LayerNorm with (almost) the same norm, so "the
        # largest norms" would be picked by float rounding (and differ between batches).
        raise ValueError(
            f"keep_outliers: expected 0 for text encoders, got {options.keep_outliers}: their layers are "
            "post-norm, so every token's hidden state has nearly the same norm and no outliers to keep"
        )
    base, family = _find_base(model)
    layers = list(_get(base, family.layers) or [])
    if not layers:
        raise TypeError(f"tome: this transformers version's {type(base).__name__} has no `{family.layers}`")
    for index, layer in enumerate(layers):
        _check_layer(index, layer, family)
    output_module = _get(base, family.output)
    handle = TextHandle(len(layers), r, protected=1, **settings)  # [CLS] / <s> stays in front
    forward = {
        "bert": _bert_layer_forward,
        "distilbert": _distilbert_layer_forward,
        "mpnet": _mpnet_layer_forward,
    }[family.kind]
    with handle.installing():
        for index, layer in enumerate(layers):
            head_dim = _get(layer, family.attention).attention_head_size
            handle.install_hook(_get(layer, family.key), _key_hook, index, handle, head_dim)
            handle.install_method(layer, "forward", forward, index, handle, family)
        handle.install_hook(output_module, _output_hook, handle)
        handle.install_pre_hook(base, _check_attention_mask, handle)
    return handle


ADAPTER = Adapter(
    library="transformers",
    classes=(
        "BertModel",
        "BertForSequenceClassification",
        "RobertaModel",
        "RobertaForSequenceClassification",
        "XLMRobertaModel",
        "XLMRobertaForSequenceClassification",
        "DistilBertModel",
        "DistilBertForSequenceClassification",
        "MPNetModel",
        "MPNetForSequenceClassification",
    ),
    kind=MASKED,
    title="text encoders (transformers BERT-family, ModernBERT, sentence-transformers)",
    apply=apply,
    handle=TextHandle,
    merged="between attention and feed-forward; each row merges its own real tokens, padding changes none of them",
    tested_on="tiny random configs; real all-MiniLM-L6-v2 (sentence-transformers)",
    defaults=TEXT_DEFAULTS,
)
