"""transformers ``Gemma3ForConditionalGeneration``: reduce once, before the decoder.

Every image reaches the language model as at most ``visual_tokens`` tokens (or with
``visual_ratio`` of its tokens merged away): its ``mm_tokens_per_image`` soft tokens (256 on the
released models: SigLIP's patches average-pooled and projected, what the language model reads)
are merged by tome's own core, and the image's run of ``image_token_id`` placeholders between its
``boi`` / ``eoi`` tokens is shortened to match (:mod:`tome.adapters.common.vlm`), as for LLaVA
(:mod:`tome.adapters.transformers_llava`). ``boi`` / ``eoi`` and all text stay.

Gemma 3 reads each image bidirectionally: its attention masks let every token of a run of
``token_type_ids == 1`` attend to the whole run (in the prefill; decode steps are causal, as
Gemma 3's own ``prepare_inputs_for_generation`` passes no ``token_type_ids`` to them).
``token_type_ids`` are shortened with the prompt, position for position, so each image's block is
exactly its kept (merged) tokens. Positions: 1-D, consecutive over the shortened prompt (text after
an image sits ``n - k`` places earlier), as for LLaVA: the language model sees an image of ``k``
tokens.

Proportional attention (``visual_prop_attn``, the default): ``log(size)`` of each merged token is
added to its key's logits in every language-model layer, global and sliding-window alike, in the
prefill and every decode step. Gemma 3 scales its logits by ``query_pre_attn_scalar ** -0.5``
before the mask is added, so the bias means the same there. A sliding-window layer whose cache is
full (decode steps beyond ``sliding_window``) holds only the latest keys: its bias is shifted by
the keys the window dropped (:func:`_sliding_prop_attn_pre_hook`). Eager and SDPA attention (Gemma 3
refuses FlashAttention itself: it drops the bidirectional block).

Merged only when ``input_ids`` and ``pixel_values`` are given (the processor's inputs); a
text-only prompt, ``inputs_embeds``, pre-computed ``mm_encoder_outputs`` or a call continuing a
cache run unchanged, as does a prompt whose placeholders do not match its images (the model
raises its own error).

Example (a tiny random Gemma 3):

>>> import torch, tome
>>> from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
>>> vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                             num_attention_heads=2, image_size=32, patch_size=4)
>>> text = Gemma3TextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
...                         sliding_window=16, layer_types=["sliding_attention", "full_attention"])
>>> gemma = Gemma3ForConditionalGeneration(Gemma3Config(vision_config=vision, text_config=text,
...     mm_tokens_per_image=16, boi_token_index=97, eoi_token_index=96, image_token_index=99)).eval()
>>> ids = torch.tensor([[1, 5, 97] + [99] * 16 + [96, 7]])  # 16 soft tokens between boi and eoi
>>> inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
...           "token_type_ids": (ids == 99).long(), "pixel_values": torch.randn(1, 3, 32, 32)}
>>> gemma = tome.patch(gemma, visual_tokens=4)
>>> out = gemma.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
>>> out.sequences.shape, out.cache.get_seq_length()  # prompt as given; the cache: 3 + 4 + 2 + 2
(torch.Size([1, 24]), 11)
>>> tome.unpatch(gemma) is gemma
True
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters.common.vlm import (
    BIAS,
    VisualHandle,
    biased_mask,
    forward_done,
    forward_reduced,
    generate_reduced,
    kept_tokens,
    prop_attn_pre_hook,
    reduce_images_tracked,
    shorten_prompts,
    size_bias,
)
from tome.runtime.registry import REDUCE_ONCE, Adapter

__all__ = ["apply"]

# Per-token inputs of forward() / generate() that lose the same positions as input_ids:
# token_type_ids makes the bidirectional block of each image, so it must shrink with it.
_PER_TOKEN = ("labels", "position_ids", "token_type_ids", "mm_token_type_ids")


def _cache_length(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 0


# -- the rewrite (module-level: patched models pickle and deep-copy) -----------------------------


def _reduced(model: nn.Module, handle: VisualHandle, ids: object, kwargs: dict) -> tuple[dict, int] | None:
    """``kwargs`` rewritten: merged soft tokens as ``mm_encoder_outputs`` instead of
    ``pixel_values``, ``input_ids``, ``token_type_ids`` and the other per-token inputs shortened;
    and the new length. ``None``: run as is."""
    pixels = kwargs.get("pixel_values")
    if (
        not handle.merges()
        or not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or not isinstance(pixels, torch.Tensor)
        or pixels.dim() != 4
        or kwargs.get("inputs_embeds") is not None
        or kwargs.get("mm_encoder_outputs") is not None
        or _cache_length(kwargs) > 0
    ):
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        return None  # a 4-D mask, or one that covers a cache: not a prompt of its own
    placeholder = model.config.image_token_id
    per_image = int(model.config.mm_tokens_per_image)
    if kept_tokens(per_image, handle.visual_tokens, handle.visual_ratio) >= per_image:
        return None  # nothing would merge: no second pass of the vision tower
    before = [per_image] * pixels.shape[0]
    if int((ids == placeholder).sum()) != sum(before):
        return None  # placeholders and images do not match: the model's own error
    image = model.get_image_features(pixel_values=pixels, return_dict=True)
    features = list(image.pooler_output)  # (images, mm_tokens_per_image, D)
    if [f.shape[0] for f in features] != before:
        return None
    merged, sources = reduce_images_tracked(features, handle.visual_tokens, handle.visual_ratio)
    after = [f.shape[0] for f in merged]
    if before == after:
        return None
    extra = {
        name: kwargs[name]
        for name in _PER_TOKEN
        if isinstance(kwargs.get(name), torch.Tensor) and kwargs[name].shape == ids.shape
    }
    if handle.visual_prop_attn:
        extra[BIAS] = size_bias(ids, placeholder, sources, after)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    shortened = shorten_prompts(
        ids, mask, placeholder, before, after, extra, pad_id=pad if isinstance(pad, int) else 0
    )
    if shortened is None:
        return None
    # Every image has the same number of soft tokens, so every one keeps the same number: the
    # (images, k, D) tensor Gemma 3 expects (and generate() repeats for beams).
    image.pooler_output = torch.stack(merged)
    rewritten = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "input_ids", "inputs")}
    rewritten.update(shortened.tensors)
    rewritten["mm_encoder_outputs"] = {"image": image}
    return rewritten, shortened.width


def _generate(model: nn.Module, handle: VisualHandle, *args, **kwargs):
    return generate_reduced(
        model, args, kwargs, lambda ids, given: _reduced(model, handle, ids, given), handle
    )


def _forward_pre_hook(handle: VisualHandle, model: nn.Module, args: tuple, kwargs: dict):
    return forward_reduced(
        model, args, kwargs, lambda ids, given: _reduced(model, handle, ids, given), handle
    )


# -- proportional attention in sliding-window layers ----------------------------------------------


def _sliding_prop_attn_pre_hook(handle: VisualHandle, module: nn.Module, args: tuple, kwargs: dict):
    """The proportional-attention pre-hook of a sliding-window layer. While the layer's cache
    holds every key since the start (the prefill, and decode steps until ``sliding_window``
    tokens), its keys are the sequence's, column for column: the shared hook. Past that, the
    cache keeps the latest ``sliding_window - 1`` keys and the mask covers those and the new
    ones: the bias, in the layout of the whole sequence, is shifted by the keys the window
    dropped."""
    bias = handle._slot.bias
    if bias is None:
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    length = getattr(cache, "get_seq_length", None)
    past = int(length(module.layer_idx)) if callable(length) else 0
    window = getattr(module, "sliding_window", None)
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    given = kwargs.get("attention_mask")
    if not isinstance(window, int) or not isinstance(hidden, torch.Tensor):
        return prop_attn_pre_hook(handle, module, args, kwargs)
    B, Q = hidden.shape[:2]
    if isinstance(given, torch.Tensor):
        dropped = past + Q - given.shape[-1]  # the keys before the mask's first column
    else:
        # no mask: every key since the start is visible (transformers builds one once the
        # window binds); a cache past the window without one is not a layout to guess at
        dropped = 0 if past < window - 1 else -1
    if dropped == 0:
        return prop_attn_pre_hook(handle, module, args, kwargs)
    if dropped < 0 or B % bias.shape[0]:
        raise NotImplementedError(
            "tome: visual_prop_attn could not line its bias up with the keys of a sliding-window "
            f"layer (cache of {past} tokens, window {window}); set model.tome.visual_prop_attn = False"
        )
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", "sdpa")
    if implementation not in ("eager", "sdpa"):
        return prop_attn_pre_hook(handle, module, args, kwargs)  # its clear error
    if dropped >= bias.shape[1]:
        return None  # the window has moved past the prompt: no merged key left in it
    mask = biased_mask(bias[:, dropped:], given, 0, B, Q, hidden, implementation, module)
    return args, {**kwargs, "attention_mask": mask}


def _install_prop_attn(handle: VisualHandle, language_model: nn.Module) -> None:
    for layer in language_model.layers:
        attention = layer.self_attn
        sliding = isinstance(getattr(attention, "sliding_window", None), int)
        hook = _sliding_prop_attn_pre_hook if sliding else prop_attn_pre_hook
        handle.install_pre_hook(attention, hook, handle)


# -- patching ---------------------------------------------------------------------------------------


def apply(model: nn.Module, **visual: object) -> VisualHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    config = model.config
    if (
        not callable(getattr(model, "get_image_features", None))
        or not isinstance(getattr(config, "image_token_id", None), int)
        or not isinstance(getattr(config, "mm_tokens_per_image", None), int)
    ):
        raise TypeError(
            f"tome: expected a Gemma 3 model with get_image_features(), config.image_token_id and "
            f"config.mm_tokens_per_image, got a {type(model).__name__}"
        )
    handle = VisualHandle(**visual)  # checks every option before the model changes
    with handle.installing():
        handle.install_method(model, "generate", _generate, handle)
        handle.install_pre_hook(model, _forward_pre_hook, handle)
        handle.install_hook(model, forward_done, handle)
        _install_prop_attn(handle, model.model.language_model)
    return handle


ADAPTER = Adapter(
    patches=("transformers.Gemma3ForConditionalGeneration",),
    apply=apply,
    kind=REDUCE_ONCE,
    handle=VisualHandle,
    title="vision-language models (transformers Gemma3ForConditionalGeneration)",
    merged="each image's soft tokens, once, before the language model, its bidirectional block "
    "kept: shorter prefill and KV cache",
    tested_on="tiny random configs (SigLIP vision + Gemma 3 text, sliding-window and global layers)",
    schedule=("visual_tokens", "visual_ratio"),
)
