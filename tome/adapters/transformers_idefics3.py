"""transformers ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``:
reduce once, before the decoder.

These models split an image into tiles (a grid of crops, then the whole image downscaled, the
"global" image); each tile goes through the vision tower and the pixel-shuffle connector and
becomes ``image_seq_len`` tokens (169 for Idefics3-8B, 64 for SmolVLM), written into its own run of
``image_token_id`` placeholders. The processor frames each run with text tokens:
``<fake_token_around_image><row_r_col_c>`` before a crop, ``<fake_token_around_image><global-img>``
before the global image, a newline after each row of crops.

The unit of merging is the tile: each tile's tokens are merged by tome's own core, by their own
similarities, down to at most ``visual_tokens`` (or with ``visual_ratio`` of them merged away), and
that tile's run of placeholders is shortened to match (:mod:`tome.adapters.common.vlm`). The
framing text tokens all stay, so the language model still reads which crop (row, column) each
merged token comes from and where the global image starts: merging across tiles would mix
tokens that the model is told come from different places. So ``visual_tokens`` counts per tile
(an image of 4 x 4 crops keeps ``17 * visual_tokens``); ``visual_ratio`` means the same per tile
and per image. Positions: 1-D, consecutive over the shortened prompt, as for LLaVA
(:mod:`tome.adapters.transformers_llava`).

What is installed on the top model (module-level functions; ``tome.unpatch`` takes it all away):
``generate`` (an instance method shadowing the class's) and a forward pre-hook, as for LLaVA, and
the proportional-attention pre-hooks on the text model's attention layers
(``model.model.text_model.layers[i].self_attn``; ``visual_prop_attn``, eager and SDPA).

Merged only when ``input_ids`` and ``pixel_values`` ``(B, tiles, 3, H, W)`` are given (the
processor's inputs, with or without ``pixel_attention_mask``); a text-only prompt,
``inputs_embeds``, pre-computed ``mm_encoder_outputs`` or a call continuing a cache run
unchanged, as does a prompt whose placeholders do not match its tiles (the model raises its own
error).

Example (a tiny random Idefics3: 32 px tiles, patch 4, pixel shuffle by 2: 16 tokens a tile):

>>> import torch, tome
>>> _ = torch.manual_seed(0)  # random weights: a fixed draw, so that no end token cuts the answer short
>>> from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig, LlamaConfig
>>> vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                               num_attention_heads=2, image_size=32, patch_size=4)
>>> text = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
>>> idefics = Idefics3ForConditionalGeneration(Idefics3Config(vision_config=vision, text_config=text,
...                                                           scale_factor=2, image_token_id=99)).eval()
>>> crop, whole = [97, 60] + [99] * 16, [10, 97, 96] + [99] * 16 + [97]  # 1 x 1 crops + global
>>> ids = torch.tensor([[1, 5] + crop + [10] + whole + [7]])
>>> inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
...           "pixel_values": torch.randn(1, 2, 3, 32, 32)}
>>> idefics = tome.patch(idefics, visual_tokens=4)
>>> out = idefics.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
>>> out.sequences.shape, out.cache.get_seq_length()  # prompt as given; the cache: 42 - 2 * 12 + 2
(torch.Size([1, 45]), 20)
>>> tome.unpatch(idefics) is idefics
True
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters.common.vlm import VisualHandle, kept_tokens, reduce_images_tracked
from tome.adapters.common.vlm_call import install_visual, is_prompt, rewritten_call, shorten_call
from tome.runtime.registry import REDUCE_ONCE, Adapter

__all__ = ["apply"]

# Per-token inputs of forward() / generate() that lose the same positions as input_ids.
_PER_TOKEN = ("labels", "position_ids")


# -- the rewrite (module-level: patched models pickle and deep-copy) -----------------------------


def _reduced(model: nn.Module, handle: VisualHandle, ids: object, kwargs: dict) -> tuple[dict, int] | None:
    """``kwargs`` rewritten: each tile's merged tokens as ``mm_encoder_outputs`` instead of
    ``pixel_values``, ``input_ids`` and the per-token inputs shortened (every tile's run of
    placeholders); and the new length. ``None``: run as is."""
    pixels = kwargs.get("pixel_values")
    if not is_prompt(handle, ids, kwargs) or not isinstance(pixels, torch.Tensor) or pixels.dim() != 5:
        return None
    placeholder = model.config.image_token_id
    per_tile = int(model.model.image_seq_len)
    if kept_tokens(per_tile, handle.visual_tokens, handle.visual_ratio) >= per_tile:
        return None  # nothing would merge: no second pass of the vision tower
    image = model.get_image_features(
        pixel_values=pixels, pixel_attention_mask=kwargs.get("pixel_attention_mask"), return_dict=True
    )
    # One (tiles of the row x image_seq_len, D) tensor per prompt row (padding tiles dropped):
    # the tiles, in the order their placeholder runs come in the batch.
    rows = image.pooler_output
    features = torch.cat(list(rows)) if isinstance(rows, list | tuple) else rows.reshape(-1, rows.shape[-1])
    if features.shape[0] % per_tile or int((ids == placeholder).sum()) != features.shape[0]:
        return None  # placeholders and tiles do not match: the model's own error
    tiles = list(features.view(-1, per_tile, features.shape[-1]))
    merged, sources = reduce_images_tracked(tiles, handle.visual_tokens, handle.visual_ratio)
    before = [per_tile] * len(tiles)
    after = [f.shape[0] for f in merged]
    if before == after:
        return None
    shortened = shorten_call(model, handle, ids, kwargs, _PER_TOKEN, before, after, sources)
    if shortened is None:
        return None
    # one entry a tile: the models concatenate them; generate() splits them by row for beams
    image.pooler_output = merged
    return rewritten_call(kwargs, shortened, {"image": image}, drop=("pixel_values", "pixel_attention_mask"))


# -- patching ---------------------------------------------------------------------------------------


def apply(model: nn.Module, **visual: object) -> VisualHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    inner = getattr(model, "model", None)
    if (
        not callable(getattr(model, "get_image_features", None))
        or not isinstance(getattr(model.config, "image_token_id", None), int)
        or not isinstance(getattr(inner, "image_seq_len", None), int)
        or not hasattr(getattr(inner, "text_model", None), "layers")
    ):
        raise TypeError(
            f"tome: expected an Idefics3 / SmolVLM model with get_image_features(), "
            f"config.image_token_id, model.image_seq_len and model.text_model, got a {type(model).__name__}"
        )
    handle = VisualHandle(**visual)  # checks every option before the model changes
    return install_visual(handle, model, _reduced, inner.text_model)


ADAPTER = Adapter(
    patches=(
        "transformers.Idefics3ForConditionalGeneration",
        "transformers.SmolVLMForConditionalGeneration",
    ),
    apply=apply,
    kind=REDUCE_ONCE,
    handle=VisualHandle,
    title="vision-language models (transformers Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration)",
    merged="each image tile's visual tokens, once, before the language model, the tiles' framing "
    "text kept: shorter prefill and KV cache",
    tested_on="tiny random configs (Idefics3, SmolVLM: pixel-shuffle connector + Llama)",
    schedule=("visual_tokens", "visual_ratio"),
)
