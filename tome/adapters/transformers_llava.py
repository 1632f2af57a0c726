"""transformers ``LlavaForConditionalGeneration`` (LLaVA-1.5 and its kin): reduce once, before the
decoder.

Every image reaches the language model as at most ``visual_tokens`` tokens (or with
``visual_ratio`` of its tokens merged away): its projected visual features (CLS already dropped
by the model) are merged by tome's own core, and the prompt's run of ``image_token_id``
placeholders for that image is shortened to match (:mod:`tome.adapters.common.vlm`). The
language model reads the shorter sequence: a shorter prefill, a smaller KV cache, every decode
step as before.

What is installed on the top model (module-level functions: a patched model deep-copies and
pickles; ``tome.unpatch`` takes it all away):

- ``generate`` (an instance method shadowing the class's): when given ``input_ids`` and
  ``pixel_values`` it computes the image features once (the model's own
  ``get_image_features``), merges them, shortens ``input_ids`` / ``attention_mask`` and calls the
  model's own ``generate`` with the merged features as ``mm_encoder_outputs`` (transformers'
  own way to give pre-computed features; it passes them to the prefill only) instead of
  ``pixel_values``. The returned sequences start with the prompt exactly as given: merging
  does not show in the output format. (A ``streamer`` is shown the shortened prompt; scores,
  logits and the new tokens are as usual.)
- a forward pre-hook (so ``forward``'s signature, which ``generate`` inspects, stays the
  class's): a direct call ``model(input_ids=..., pixel_values=...)`` is rewritten the same way,
  ``labels`` included, so its logits have the shortened length;
- a forward pre-hook on every language-model layer's self-attention, acting while
  ``visual_prop_attn`` is on (the default): proportional attention, ``log(size)`` of each merged
  visual token added to its key's logits, in the prefill and every decode step
  (:func:`tome.adapters.common.vlm.install_prop_attn`).

Why merge the projected features, and by their own similarity: that is what the language model
reads (a merged token is the mean of the embeddings it replaces), it needs no attention weights
(SDPA / FlashAttention stay on) and no knowledge of the vision tower's layers. Not measured
against other choices (the vision tower's keys, merging before the projector): no trained VLM is
reachable offline here (docs/vlm.md).

With ``visual_dominant`` (off by default: docs/vlm_dominant.md), each image's dominant tokens
(VisionZip's: the vision tower's class-token attention at the layer the model reads, averaged
over heads, read by a hook that is installed only for the ``get_image_features`` call) are
kept whole and the rest merged (:mod:`tome.adapters.common.dominant`).

With ``vision_r`` (off by default: docs/vlm_tower.md), the vision tower's own layers merge
tokens too (tome's patch of the CLIP tower, ``r=vision_r``), and the final merge continues from
the tower's sizes and sources, so each image's placeholders are still shortened to the final
count and proportional attention counts every patch once (:mod:`tome.adapters.common.tower`).

Merged only when ``input_ids`` and ``pixel_values`` are given (the processor's inputs); a
text-only prompt, ``inputs_embeds`` or pre-computed ``mm_encoder_outputs`` run unchanged. A
prompt whose placeholders do not match its images runs unchanged too, so the model raises its
own error.

Example (a tiny random LLaVA):

>>> import torch, tome
>>> _ = torch.manual_seed(0)  # random weights: a fixed draw, so that no end token cuts the answer short
>>> from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
>>> vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                           num_attention_heads=2, image_size=32, patch_size=4)
>>> text = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
>>> llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=99)).eval()
>>> ids = torch.tensor([[1, 5] + [99] * 64 + [7]])  # 64 placeholders: (32 / 4) ** 2 patches
>>> inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
...           "pixel_values": torch.randn(1, 3, 32, 32)}
>>> llava = tome.patch(llava, visual_tokens=16)
>>> out = llava.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
>>> out.sequences.shape, out.cache.get_seq_length()  # prompt as given; the cache: 3 + 16 + 2
(torch.Size([1, 70]), 21)
>>> tome.unpatch(llava) is llava
True
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters.common.dominant import (
    DominantVisualHandle,
    recording_attention,
    reduce_images_dominant,
    sizes_bias,
)
from tome.adapters.common.tower import TowerVisualHandle, install_tower, read_history, reduce_images_from
from tome.adapters.common.vlm import VISUAL_DEFAULTS as DEFAULTS
from tome.adapters.common.vlm import reduce_images_tracked
from tome.adapters.common.vlm_call import install_visual, is_prompt, require, rewritten_call, shorten_call
from tome.runtime.registry import REDUCE_ONCE, Adapter

__all__ = ["DEFAULTS", "DominantVisualHandle", "TowerVisualHandle", "apply"]

# Per-token inputs of forward() that lose the same positions as input_ids.
_PER_TOKEN = ("labels", "position_ids", "token_type_ids")
# Arguments of get_image_features that forward() and generate() take.
_ENCODER_ARGS = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")


# -- dominant tokens: where the vision tower's attention is read ----------------------------------


def _read_layer(model: nn.Module, kwargs: dict) -> tuple[nn.Module, bool]:
    """The attention module whose layer produces the hidden states the model reads
    (``vision_feature_layer``: ``hidden_states[f]`` is the output of layer ``f - 1``; the last
    one listed when it is a list), and whether the tower has a class token."""
    tower = model.model.vision_tower
    inner = getattr(tower, "vision_model", tower)
    layers = getattr(getattr(inner, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(layers[0], "self_attn"):
        raise NotImplementedError(
            f"visual_dominant: expected a vision tower with encoder.layers[i].self_attn (CLIP, "
            f"SigLIP), got a {type(tower).__name__}; set model.tome.visual_dominant = None"
        )
    chosen = kwargs.get("vision_feature_layer")
    if chosen is None:
        chosen = model.config.vision_feature_layer
    if isinstance(chosen, list | tuple):
        chosen = chosen[-1]
    index = int(chosen) % (len(layers) + 1)  # into hidden_states: the embeddings, then each layer
    if index == 0:
        raise NotImplementedError(
            f"visual_dominant: vision_feature_layer={chosen} reads the embeddings, which no "
            f"attention layer produced; set model.tome.visual_dominant = None"
        )
    has_cls = isinstance(getattr(getattr(inner, "embeddings", None), "class_embedding", None), torch.Tensor)
    return layers[index - 1].self_attn, has_cls


def _image_scores(
    seen: list[torch.Tensor], features: list[torch.Tensor], strategy: str, has_cls: bool
) -> list[torch.Tensor]:
    """Each image's scores, over the tokens that may merge (the features after the first,
    under ``"full"``), from what the vision layer recorded (one row per image, over the layer's
    tokens but its class token)."""
    if len(seen) != 1 or seen[0].shape[0] != len(features):
        raise NotImplementedError(
            f"visual_dominant: expected the vision tower to run its layers once over the "
            f"{len(features)} images as a batch, saw {len(seen)} runs; set model.tome.visual_dominant = None"
        )
    scores = seen[0]
    # The mergeable features are the layer's tokens but the first (dropped by "default", kept
    # whole by "full"); the scores leave out the class token only: one to skip without one.
    skip = 1 - int(has_cls)
    if scores.shape[1] - skip != features[0].shape[0] - int(strategy == "full"):
        raise NotImplementedError(
            f"visual_dominant: the vision layer has {scores.shape[1] + int(has_cls)} tokens per image, "
            f"the model reads {features[0].shape[0]}; set model.tome.visual_dominant = None"
        )
    return list(scores[:, skip:])


# -- vision_r: merging inside the tower too ------------------------------------------------------


def _tower_layer(model: nn.Module, kwargs: dict) -> int:
    """The ``vision_feature_layer`` a call reads; one layer only (several would be
    concatenated feature-wise, and they hold different numbers of merged tokens)."""
    chosen = kwargs.get("vision_feature_layer")
    if chosen is None:
        chosen = model.config.vision_feature_layer
    if isinstance(chosen, bool) or not isinstance(chosen, int):
        raise NotImplementedError(
            f"vision_r: the model reads the vision layers {chosen!r} together, which hold "
            f"different numbers of tokens once the tower merges; read one layer "
            f"(vision_feature_layer=-2) or set model.tome.vision_r = None"
        )
    return chosen


def _reduce_after_tower(
    model: nn.Module,
    handle: TowerVisualHandle,
    image: object,
    features: list[torch.Tensor],
    chosen: int,
    protected: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The features of a tower that merged (``image``: ``get_image_features``' output, with the
    hidden states of the layer ``chosen``, which the model reads) reduced by the final merge
    from the tower's sizes and sources (:func:`~tome.adapters.common.tower.reduce_images_from`),
    with each image's source map over its original tokens."""
    tower = handle.tower()
    count = tower.num_layers
    index = chosen % (count + 1)  # into hidden_states: the embeddings, then each layer
    states = getattr(image, "hidden_states", None)
    hidden = states[chosen] if states is not None else None
    if len(features) != (hidden.shape[0] if hidden is not None else len(features)):
        raise NotImplementedError(
            f"vision_r: expected one tower row per image, got {hidden.shape[0]} rows for "
            f"{len(features)} images; set model.tome.vision_r = None"
        )
    inner = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    grid = int(inner.embeddings.num_patches)
    has_cls = isinstance(getattr(inner.embeddings, "class_embedding", None), torch.Tensor)
    # "default" drops the tower's first token (the class token): its source map leaves it out
    drop = protected == 0
    if drop and not has_cls:
        raise NotImplementedError(
            "vision_r: the model drops the first token of a vision tower without a class token "
            "(vision_feature_select_strategy='default'), which may hold several merged patches; "
            "use 'full' or set model.tome.vision_r = None"
        )
    history = read_history(tower, hidden, index - 1, drop, len(features), grid + int(has_cls))
    return reduce_images_from(features, history, handle.visual_tokens, handle.visual_ratio, protected)


# -- the rewrite (module-level: patched models pickle and deep-copy) -----------------------------


def _reduced(
    model: nn.Module, handle: TowerVisualHandle, ids: object, kwargs: dict
) -> tuple[dict, int] | None:
    """``kwargs`` (a forward's or generate's keyword arguments, ``input_ids`` given as ``ids``)
    rewritten: merged image features as ``mm_encoder_outputs`` instead of ``pixel_values``,
    ``input_ids`` and the per-token inputs shortened; and the new length. ``None``: run as is."""
    if not is_prompt(handle, ids, kwargs):
        return None
    pixels = kwargs["pixel_values"]
    encoder = {name: kwargs[name] for name in _ENCODER_ARGS if kwargs.get(name) is not None}
    # "full": the model passes the class token on, first in each image's features; it stays.
    strategy = kwargs.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
    protected = int(strategy == "full")
    if handle.tower_merges():
        chosen = _tower_layer(model, kwargs)  # refused before the tower runs
        image = model.get_image_features(pixel_values=pixels, return_dict=True, **encoder)
        features = list(image.pooler_output)
        merged, sources = _reduce_after_tower(model, handle, image, features, chosen, protected)
    elif handle.dominant():
        attention, has_cls = _read_layer(model, kwargs)
        with recording_attention(attention, has_cls) as seen:
            image = model.get_image_features(pixel_values=pixels, return_dict=True, **encoder)
        features = list(image.pooler_output)
        scores = _image_scores(seen, features, strategy, has_cls)
        merged, _, sizes = reduce_images_dominant(
            features, scores, handle.visual_tokens, handle.visual_ratio, handle.visual_dominant, protected
        )
        sources = None  # the sizes say it: dominant tokens stand alone
    else:
        image = model.get_image_features(pixel_values=pixels, return_dict=True, **encoder)
        features = list(image.pooler_output)
        merged, sources = reduce_images_tracked(
            features, handle.visual_tokens, handle.visual_ratio, protected
        )
    # the placeholders each image has in the prompt: its original tokens (the tower's merges
    # included, which the source maps cover)
    before = [f.shape[0] for f in features] if sources is None else [s.shape[0] for s in sources]
    after = [f.shape[0] for f in merged]
    if before == after:
        return None
    placeholder = model.config.image_token_id
    bias = None
    if handle.visual_prop_attn and sources is None and int((ids == placeholder).sum()) == sum(before):
        bias = sizes_bias(ids, placeholder, sizes, before)
    shortened = shorten_call(model, handle, ids, kwargs, _PER_TOKEN, before, after, sources, bias=bias)
    if shortened is None:
        return None  # placeholders and images do not match: the model's own error
    image.pooler_output = merged
    return rewritten_call(kwargs, shortened, {"image": image})


# -- patching ---------------------------------------------------------------------------------------


def apply(model: nn.Module, **visual: object) -> TowerVisualHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    require(model, "a LLaVA", methods=("get_image_features",), ints=("image_token_id",))
    handle = TowerVisualHandle(**visual)  # checks every option before the model changes
    tower = None
    if handle.vision_r is not None:
        tower = install_tower(model.model.vision_tower, handle.vision_r)
    handle.__dict__["_tower"] = tower  # undone with the rest if installing fails below
    return install_visual(handle, model, _reduced, model.model.language_model)


ADAPTER = Adapter(
    patches=("transformers.LlavaForConditionalGeneration",),
    apply=apply,
    kind=REDUCE_ONCE,
    handle=TowerVisualHandle,
    title="vision-language models (transformers LlavaForConditionalGeneration)",
    merged="each image's visual tokens, once, before the language model: shorter prefill and KV cache",
    tested_on="tiny random configs (CLIP vision + Llama)",
    schedule=("visual_tokens", "visual_ratio"),
)
