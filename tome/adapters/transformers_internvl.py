"""transformers ``InternVLForConditionalGeneration`` (InternVL2.5 / InternVL3 and their kin): reduce
once, before the decoder.

InternVL cuts an image into tiles (dynamic resolution: up to a dozen 448 px crops plus a thumbnail
of the whole image), runs each tile through the vision tower, folds each 2x2 block of patches into
one token (pixel shuffle) and projects it (an MLP): each tile becomes ``image_seq_length`` tokens
(256), and the processor writes ``<img>`` + ``tiles x image_seq_length`` placeholders
(``image_token_id``) + ``</img>`` for the image.

**The merging unit is an image: all its tiles together.** ``visual_tokens`` / ``visual_ratio``
mean what they mean for every family (each *image* reaches the language model as at most
``visual_tokens`` tokens), and the matching may pair tokens of different tiles (neighbouring crops
overlap in content, and the thumbnail repeats the whole image at a coarser scale: those are the
redundancies worth removing first). An image is found as a run of consecutive placeholders in the
prompt (the processor frames each with ``<img>`` / ``</img>``, so two images never touch); its
tiles are the next ``run / tokens per tile`` entries of ``pixel_values``. A video's frames reach
the model as one-tile images (``Frame1: <img>...</img>``): each frame merges on its own.

The tokens each image keeps are the size-weighted means of the tokens they hold (tome's core,
:mod:`tome.adapters.common.vlm`), written into the image's first ``k`` placeholders; the prompt is
shortened to match. Positions are 1-D RoPE (a Qwen2 / Llama language model) numbered over the
shortened prompt, as for LLaVA: the language model sees an image of ``k`` tokens, and the text
after it sits ``n - k`` positions earlier than it would have (no position ids to keep: the model
itself numbers the prompt consecutively, whatever an image's size).

What is installed on the top model (module-level functions: a patched model deep-copies and
pickles; ``tome.unpatch`` takes it all away): ``generate`` (an instance method shadowing the
class's), a forward pre-hook for direct calls, and the proportional-attention pre-hooks on the
language model's attention layers (``visual_prop_attn``), as for LLaVA
(:mod:`tome.adapters.transformers_llava`).

The merged features go to the model as ``mm_encoder_outputs`` with ``pooler_output`` of shape
``(tokens, 1, D)``: the model scatters them into the placeholders whatever the leading shape, and
``generate()``'s beam search splits and repeats them per prompt by counting placeholders, which
works for any per-image count only when every entry is one token long.

Merged only when ``input_ids`` and ``pixel_values`` are given; a text-only prompt,
``inputs_embeds`` or pre-computed ``mm_encoder_outputs`` run unchanged, as does a prompt whose
placeholders do not match its tiles (the model raises its own error).

Example (a tiny random InternVL: 16 tokens a tile, one image of two tiles):

>>> import torch, tome, transformers
>>> _ = torch.manual_seed(0)  # random weights: a fixed draw, so that no end token cuts the answer short
>>> vision = transformers.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...     num_attention_heads=2, image_size=32, patch_size=4)
>>> text = transformers.Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
>>> internvl = transformers.InternVLForConditionalGeneration(transformers.InternVLConfig(
...     vision_config=vision, text_config=text, image_token_id=99, image_seq_length=16)).eval()
>>> ids = torch.tensor([[1, 5, 97] + [99] * 32 + [96, 7]])  # <img>, 2 tiles x 16, </img>
>>> inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
...           "pixel_values": torch.randn(2, 3, 32, 32)}
>>> internvl = tome.patch(internvl, visual_tokens=8)
>>> out = internvl.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
>>> out.sequences.shape, out.cache.get_seq_length()  # prompt as given; the cache: 3 + 8 + 2 + 2
(torch.Size([1, 40]), 15)
>>> tome.unpatch(internvl) is internvl
True
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters.common.vlm import VisualHandle, reduce_images_tracked
from tome.adapters.common.vlm_call import install_visual, is_prompt, require, rewritten_call, shorten_call
from tome.runtime.registry import REDUCE_ONCE, Adapter

__all__ = ["apply", "image_runs"]

# Per-token inputs of forward() that lose the same positions as input_ids.
_PER_TOKEN = ("labels", "position_ids", "token_type_ids")
# Arguments of get_image_features that forward() and generate() take.
_ENCODER_ARGS = ("vision_feature_layer", "vision_feature_select_strategy")


def image_runs(input_ids: torch.Tensor, placeholder: int) -> list[int]:
    """The lengths of the runs of consecutive ``placeholder`` tokens in ``input_ids`` ``(B, L)``,
    row by row, left to right: one run per image (all its tiles), in the order the model writes
    the features in. One host sync, no loop over tokens.

    >>> image_runs(torch.tensor([[5, 9, 9, 6, 9], [9, 9, 9, 7, 7]]), 9)
    [2, 1, 3]
    """
    is_image = input_ids == placeholder
    # a run starts where a placeholder follows a non-placeholder or opens a row
    starts = is_image.clone()
    starts[:, 1:] &= ~is_image[:, :-1]
    run = starts.reshape(-1).long().cumsum(0) - 1
    run = run[is_image.reshape(-1)]
    if run.numel() == 0:
        return []
    return torch.bincount(run).tolist()


# -- the rewrite (module-level: patched models pickle and deep-copy) -----------------------------


def _reduced(model: nn.Module, handle: VisualHandle, ids: object, kwargs: dict) -> tuple[dict, int] | None:
    """``kwargs`` rewritten: merged image features as ``mm_encoder_outputs`` instead of
    ``pixel_values``, ``input_ids`` and the per-token inputs shortened; and the new length.
    ``None``: run as is."""
    if not is_prompt(handle, ids, kwargs):
        return None
    pixels = kwargs["pixel_values"]
    placeholder = model.config.image_token_id
    encoder = {name: kwargs[name] for name in _ENCODER_ARGS if kwargs.get(name) is not None}
    image = model.get_image_features(pixel_values=pixels, return_dict=True, **encoder)
    tiles = image.pooler_output  # (tiles, tokens per tile, D)
    per_tile = tiles.shape[1]
    before = image_runs(ids, placeholder)
    if sum(before) != tiles.shape[0] * per_tile or any(n % per_tile for n in before):
        return None  # placeholders and tiles do not match: the model's own error
    images = list(tiles.reshape(-1, tiles.shape[-1]).split(before))  # one entry per image
    merged, sources = reduce_images_tracked(images, handle.visual_tokens, handle.visual_ratio)
    after = [f.shape[0] for f in merged]
    if before == after:
        return None
    shortened = shorten_call(model, handle, ids, kwargs, _PER_TOKEN, before, after, sources)
    if shortened is None:
        return None
    # (tokens, 1, D): generate()'s expansion for beams splits the features per prompt by
    # counting placeholders; entries of one token each split anywhere.
    image.pooler_output = torch.cat(merged)[:, None, :]
    return rewritten_call(kwargs, shortened, {"image": image})


# -- patching ---------------------------------------------------------------------------------------


def apply(model: nn.Module, **visual: object) -> VisualHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    require(model, "an InternVL", methods=("get_image_features",), ints=("image_token_id",))
    handle = VisualHandle(**visual)  # checks every option before the model changes
    return install_visual(handle, model, _reduced, model.model.language_model)


ADAPTER = Adapter(
    patches=("transformers.InternVLForConditionalGeneration",),
    apply=apply,
    kind=REDUCE_ONCE,
    handle=VisualHandle,
    title="vision-language models (transformers InternVLForConditionalGeneration)",
    merged="each image's visual tokens (all its tiles together), once, before the language model: "
    "shorter prefill and KV cache",
    tested_on="tiny random configs (InternVL vision + Qwen2)",
    schedule=("visual_tokens", "visual_ratio"),
)
