"""Hugging Face ModernBERT (``ModernBertModel`` and its sequence classifier): rotary positions,
alternating global and local (sliding-window) attention, pre-norm layers.

Each patched layer is re-composed from its own parts::

    x = x + attn(attn_norm(x))          # the model's own eager/sdpa attention, RoPE cos/sin
    x = merge(x)                        # between attention and MLP (after the residual)
    x = x + mlp(mlp_norm(x))

and the final norm's output is unmerged (``unmerge_output``) so pooling sees every token. As for
the BERT family (:mod:`tome.adapters.transformers_text`; the handle both extend,
:class:`~tome.adapters.common.text.TextHandle`, is in :mod:`tome.adapters.common.text`),
padding never merges with real tokens, every row merges by its own similarities (batch
invariance), ``ratio`` / ``min_tokens`` / ``hidden_weight`` work the same, and packed sequences
take ``tome_sequence_ids`` (with ``position_ids`` restarting in every document). The merge metric
is the keys *before* RoPE (what a token says, not where it is).

Where a merged token is, for RoPE and for the local window (settable on the handle):

- ``positions="first"`` (default): its first original's position; ``"mean"``: the mean of the
  original positions it holds (a float position: RoPE is defined for any real angle). The
  model's own rotary module computes cos/sin for these positions. "first" measured better than
  "mean" on both halves of the texts, at both ratios and lengths of
  ``benchmarks/text_modernbert.py --init-range 0.1`` (random weights: no trained ModernBERT is
  reachable here), e.g. pooled cosine 0.9782 vs 0.9772 (tuning half) and 0.9789 vs 0.9770
  (held-out half) at ratio 0.1 and 512 tokens; a mean of far-apart positions lands where none of
  its tokens was.
- ``window="span"`` (default): in a local layer a query attends to a key if *some* original of
  the one lies within the window of *some* original of the other (the groups' position
  intervals overlap within the window): every pair of tokens that attended before merging
  still does. ``"position"``: by the merged tokens' positions alone (measured equal or worse:
  at ratio 0.2 and 512 tokens 0.9550 / 0.9591 for span against 0.9540 / 0.9551).

Until a block has merged anything, the model's own cos/sin and masks are used unchanged, so
``r=0`` is exact.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters.common.classes import class_names, find_known
from tome.adapters.common.text import (
    TEXT_DEFAULTS,
    TextFamily,
    TextHandle,
    begin_text_layer,
    check_attention_mask,
    refuse_outliers,
)
from tome.runtime.handle import BlockCall, current_sequence_ids
from tome.runtime.options import Option, one_of
from tome.runtime.registry import MASKED, Adapter

POSITION_RULES = ("first", "mean")
WINDOW_RULES = ("span", "position")
# Forwarded by a pre-hook on the base model to every layer (as tome_sequence_ids is): the
# position ids of the pass, so merged tokens know where their originals were.
POSITIONS_KEYWORD = "tome_position_ids"

_FAMILY = TextFamily("layers", "ModernBertEncoderLayer", "attn.Wqkv", "attn", "modernbert", "final_norm")
_PARTS = ("attn_norm", "attn", "mlp_norm", "mlp")


class ModernBertHandle(TextHandle):
    """:class:`TextHandle` plus where merged tokens are for RoPE and the local window."""

    positions = Option(
        "first",
        one_of(*POSITION_RULES),
        "where a merged token is for RoPE: its first original position ('first') or their mean ('mean')",
    )
    window = Option(
        "span",
        one_of(*WINDOW_RULES),
        "local layers: a key is in a query's window if any of their originals are ('span'), or by the "
        "merged tokens' positions ('position')",
    )


def _check_layer(index: int, layer: nn.Module) -> None:
    missing = [p for p in _PARTS if not isinstance(getattr(layer, p, None), nn.Module)]
    if "ModernBertEncoderLayer" not in class_names(layer) or missing:
        raise TypeError(
            f"tome: ModernBERT layer {index} is a {type(layer).__name__}"
            f"{' without ' + ', '.join(missing) if missing else ''}; expected a ModernBertEncoderLayer with "
            f"parts {', '.join(_PARTS)} (the layer structure of transformers 5)"
        )
    attn = layer.attn
    if not isinstance(getattr(attn, "Wqkv", None), nn.Linear) or not isinstance(
        getattr(attn, "head_dim", None), int
    ):
        raise TypeError(f"tome: ModernBERT layer {index}: its attention has no Wqkv projection / head_dim")


def _group_positions(
    handle: ModernBertHandle, call: BlockCall, original: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, N)`` float position of every current token (by ``handle.positions``), and the
    lowest / highest original position it holds (real originals only)."""
    history = call.history
    source, B, N = history.source, history.sizes.shape[0], history.sizes.shape[1]
    original = original.to(torch.float32).expand(B, -1)
    valid = call.pass_state.key_valid
    weight = torch.ones_like(original) if valid is None else valid.to(torch.float32)
    real = weight > 0
    zeros = original.new_zeros(B, N)
    far = torch.finfo(torch.float32).max
    low = zeros.scatter_reduce(1, source, torch.where(real, original, far), "amin", include_self=False)
    high = zeros.scatter_reduce(1, source, torch.where(real, original, -far), "amax", include_self=False)
    if handle.positions == "mean":
        total = zeros.scatter_add(1, source, original * weight)
        count = zeros.scatter_add(1, source, weight)
        position = total / count.clamp_min(1)
    else:
        first = torch.full((B, N), source.shape[1] - 1, dtype=source.dtype, device=source.device)
        order = torch.arange(source.shape[1], device=source.device).expand_as(source)
        first = first.scatter_reduce(1, source, torch.where(real, order, source.shape[1] - 1), "amin")
        position = original.gather(1, first)
    # A group of padding only: no real original; any finite position (it is masked).
    low = torch.where(low.abs() < far, low, position)
    high = torch.where(high.abs() < far, high, position)
    return position, low, high


def _merged_mask(
    handle: ModernBertHandle,
    call: BlockCall,
    dtype: torch.dtype,
    window: int | None,
    spans: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """``(B, 1, N, N)`` additive mask of a merged (or packed) layer: padding keys masked, other
    documents masked, keys outside the local window masked, log(size) on the rest."""
    sizes = call.history.sizes
    B, N = sizes.shape
    allowed = torch.ones(B, N, N, dtype=torch.bool, device=sizes.device)
    if call.valid is not None:
        allowed = allowed & call.valid[:, None, :]
    ids = call.pass_state.sequence_ids
    if ids is not None:
        current = current_sequence_ids(call)
        allowed = allowed & (current[:, :, None] == current[:, None, :])
    if window is not None and spans is not None:
        position, low, high = spans
        if handle.window == "span":
            near = ((low[:, None, :] - high[:, :, None]) <= window) & (
                (low[:, :, None] - high[:, None, :]) <= window
            )
        else:
            near = (position[:, :, None] - position[:, None, :]).abs() <= window
        allowed = allowed & near
    # Every query may attend to itself, so no row of the softmax is empty (padding queries).
    allowed = allowed | torch.eye(N, dtype=torch.bool, device=sizes.device)
    bias = sizes.clamp_min(1).log() if (handle.prop_attn and call.merged) else torch.zeros_like(sizes)
    out = torch.where(allowed, bias.to(dtype)[:, None, :], torch.finfo(dtype).min)
    return out[:, None]


def _layer_forward(
    layer: nn.Module,
    index: int,
    handle: ModernBertHandle,
    rotary: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> torch.Tensor:
    original_positions = kwargs.pop(POSITIONS_KEYWORD, None)
    call = begin_text_layer(layer, index, handle, _FAMILY, hidden_states, attention_mask, kwargs)
    window = None if layer.attention_type == "full_attention" else layer.attn.config.sliding_window
    packed = call.pass_state.sequence_ids is not None
    mask, cos_sin = attention_mask, position_embeddings
    if call.merged or packed:
        B, N = hidden_states.shape[:2]
        spans = None
        if call.merged:
            N0 = call.history.source.shape[1]
            if original_positions is None:
                original_positions = torch.arange(N0, device=hidden_states.device)[None]
            spans = _group_positions(handle, call, original_positions.to(hidden_states.device))
            cos_sin = rotary(hidden_states, spans[0], layer.attention_type)
        elif original_positions is not None:
            spans = (original_positions.float().expand(B, N),) * 3
        else:
            spans = (torch.arange(N, device=hidden_states.device, dtype=torch.float32).expand(B, N),) * 3
        if window is None and not packed:
            mask = handle.attention_bias(call, hidden_states.dtype)
        else:
            mask = _merged_mask(handle, call, hidden_states.dtype, window, spans)
    handle.take_keys()  # nothing left over from an interrupted call in this thread
    attn_output = layer.attn(
        layer.attn_norm(hidden_states), position_embeddings=cos_sin, attention_mask=mask, **kwargs
    )[0]
    x = hidden_states + attn_output
    x = handle.merge_layer(call, x, handle.matching_metric(handle.take_keys(), x))
    return handle.end_layer(call, x + layer.mlp(layer.mlp_norm(x)))


def _key_hook(
    index: int, handle: ModernBertHandle, head_dim: int, module: nn.Module, args: tuple, output
) -> None:
    # Wqkv's output (B, N, 3 * heads * head_dim): the keys, before RoPE.
    qkv = output.unflatten(-1, (3, -1, head_dim))
    handle.offer_keys(index, qkv[..., 1, :, :])


def _final_norm_hook(handle: ModernBertHandle, module: nn.Module, args: tuple, output: torch.Tensor):
    tokens = args[0] if args else None
    if not isinstance(tokens, torch.Tensor) or not isinstance(output, torch.Tensor):
        return None
    if not torch.compiler.is_compiling() and handle.history_of(tokens) is None:
        return None  # not the output of a pass of this model
    handle.follow(output, tokens)
    if not handle.unmerge_output:
        return None
    return handle.unmerge(output)


def _forward_positions(handle: ModernBertHandle, module: nn.Module, args: tuple, kwargs: dict):
    """Pre-hook of the base model: check the attention mask, and hand the pass's position ids
    to every layer (by a keyword that the model forwards to its layers)."""
    check_attention_mask(handle, module, args, kwargs)
    positions = kwargs.get("position_ids")
    if positions is None and len(args) > 2:
        positions = args[2]
    if isinstance(positions, torch.Tensor):
        return args, {**kwargs, POSITIONS_KEYWORD: positions}
    return None


def apply(model: nn.Module, *, r, **settings) -> ModernBertHandle:
    refuse_outliers(
        settings, "in a padded batch it would make a text's merges depend on the rest of its batch"
    )
    found = find_known((model, getattr(model, "base_model", None)), {"ModernBertModel": _FAMILY})
    if found is None:
        raise TypeError(f"tome: {type(model).__name__} has no ModernBertModel inside")
    base = found[0]
    layers = list(getattr(base, "layers", None) or [])
    rotary = getattr(base, "rotary_emb", None)
    final_norm = getattr(base, "final_norm", None)
    if not layers or not isinstance(rotary, nn.Module) or not isinstance(final_norm, nn.Module):
        raise TypeError(
            f"tome: this transformers version's {type(base).__name__} has no layers / rotary_emb / final_norm"
        )
    for index, layer in enumerate(layers):
        _check_layer(index, layer)
    handle = ModernBertHandle(len(layers), r, protected=1, **settings)  # [CLS] stays in front
    with handle.installing():
        for index, layer in enumerate(layers):
            handle.install_hook(layer.attn.Wqkv, _key_hook, index, handle, layer.attn.head_dim)
            handle.install_method(layer, "forward", _layer_forward, index, handle, rotary)
        handle.install_hook(final_norm, _final_norm_hook, handle)
        handle.install_pre_hook(base, _forward_positions, handle)
    return handle


__all__ = ["ADAPTER", "ModernBertHandle", "apply"]

ADAPTER = Adapter(
    patches=("transformers.ModernBertModel", "transformers.ModernBertForSequenceClassification"),
    apply=apply,
    kind=MASKED,
    handle=ModernBertHandle,
    title="text encoders (transformers BERT-family, ModernBERT, sentence-transformers)",
    merged="between attention and MLP; RoPE at each merged token's first original position, local windows "
    "by its originals' span",
    tested_on="tiny random configs",
    defaults=TEXT_DEFAULTS,
)
