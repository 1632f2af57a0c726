"""transformers ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6): reduce once, before
the decoder. (``LlavaOnevisionForConditionalGeneration`` and ``LlavaNextVideoForConditionalGeneration``
read their images the same way, and videos too: :mod:`tome.adapters.transformers_llava_next_video`.)

It cuts an image into crops (AnyRes) and gives the language model, per image, one packed run of
features: the base image's tokens, then the crops' tokens unpadded to the image's aspect ratio,
with the learned ``image_newline`` after every row (OneVision first shrinks a crop grid larger
than ``vision_aspect_ratio`` allows). An image's token count thus depends on its
``image_sizes`` entry: images of one batch differ. Every image reaches the language model as
:func:`~tome.adapters.common.vlm.kept_tokens` of its ``n`` packed tokens (at most
``visual_tokens``, or with ``visual_ratio`` of them merged away): its visual tokens, base and
crops as one set, merged by tome's core to ``k - 1``, then one newline standing for the image's
``R`` newlines (size ``R``), so that the image still ends as the model was trained to see it end
(:func:`tome.adapters.common.anyres.reduce_packed`: why the newlines stay out of the merge). The
prompt's run of ``image_token_id`` placeholders for that image is shortened to match
(:func:`~tome.adapters.common.vlm.shorten_prompts`); each image merges by its own similarities,
so a row's result does not depend on the other images of its batch.

Positions: 1-D RoPE (Llama, Mistral, Qwen2 language models), numbered consecutively over the
shorter sequence, as for LLaVA (:mod:`tome.adapters.transformers_llava`): the language model
sees an image of ``k`` tokens, as if the vision side had produced that many.

What is installed on the top model, as for LLaVA (module-level functions: a patched model
deep-copies and pickles; ``tome.unpatch`` takes it all away): ``generate`` (an instance method
shadowing the class's; it computes the image features once with the model's own
``get_image_features``, merges them and calls the class's ``generate`` with them as
``mm_encoder_outputs`` instead of ``pixel_values``), a forward pre-hook doing the same for a
direct ``model(...)`` call (``labels`` shortened too), and the proportional-attention pre-hooks
on the language model's attention layers (``visual_prop_attn``).

Merged only when ``input_ids``, ``pixel_values`` and ``image_sizes`` are given (the processor's
inputs); a text-only prompt, ``inputs_embeds`` or pre-computed ``mm_encoder_outputs`` run
unchanged, as does a prompt whose placeholders do not match its images (the model raises its
own error). The rewrite itself is :func:`tome.adapters.common.anyres.rewrite_anyres`.

Example (a tiny random LLaVA-NeXT: 16 px crops of 4 px patches, 16 tokens each):

>>> import torch, tome
>>> _ = torch.manual_seed(0)  # random weights: a fixed draw, so that no end token cuts the answer short
>>> from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
>>> vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                           num_attention_heads=2, image_size=16, patch_size=4)
>>> text = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
>>> config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=99,
...                          image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
>>> model = LlavaNextForConditionalGeneration(config).eval()
>>> sizes = torch.tensor([[32, 32]])  # a 2x2 grid of crops: 16 + 8 rows of (8 + newline) = 88 tokens
>>> ids = torch.tensor([[1, 5] + [99] * 88 + [7]])
>>> inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_sizes": sizes,
...           "pixel_values": torch.randn(1, 5, 3, 16, 16)}  # the base image and 4 crops
>>> model = tome.patch(model, visual_tokens=16)
>>> out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
>>> out.sequences.shape, out.cache.get_seq_length()  # prompt as given; the cache: 2 + 16 + 1 + 2
(torch.Size([1, 94]), 21)
>>> tome.unpatch(model) is model
True
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters.common.anyres import rewrite_anyres
from tome.adapters.common.vlm import VISUAL_DEFAULTS as DEFAULTS
from tome.adapters.common.vlm import (
    VisualHandle,
)
from tome.adapters.common.vlm_call import install_visual, require
from tome.runtime.registry import REDUCE_ONCE, Adapter

__all__ = ["DEFAULTS", "VisualHandle", "apply"]


# -- the rewrite (module-level: patched models pickle and deep-copy) -----------------------------


# -- patching ---------------------------------------------------------------------------------------


def apply(model: nn.Module, **visual: object) -> VisualHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    require(model, "a LLaVA-NeXT", methods=("get_image_features",), ints=("image_token_id",))
    if not isinstance(getattr(model.model, "image_newline", None), torch.Tensor):
        raise TypeError(
            f"tome: expected a LLaVA-NeXT model with model.image_newline, got a {type(model).__name__}"
        )
    handle = VisualHandle(**visual)  # checks every option before the model changes
    return install_visual(handle, model, rewrite_anyres, model.model.language_model)


ADAPTER = Adapter(
    patches=("transformers.LlavaNextForConditionalGeneration",),
    apply=apply,
    kind=REDUCE_ONCE,
    handle=VisualHandle,
    title="vision-language models with AnyRes crops (transformers LlavaNextForConditionalGeneration)",
    merged=(
        "each image's packed visual tokens (base image and crops; the row newlines kept as one), "
        "once, before the language model: shorter prefill and KV cache"
    ),
    tested_on="tiny random configs (CLIP vision + Llama)",
    schedule=("visual_tokens", "visual_ratio"),
)
