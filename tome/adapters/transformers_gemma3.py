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
the keys the window dropped (:func:`~tome.adapters.common.vlm.sliding_prop_attn_pre_hook`). Eager and SDPA attention (Gemma 3
refuses FlashAttention itself: it drops the bidirectional block).

Merged only when ``input_ids`` and ``pixel_values`` are given (the processor's inputs); a
text-only prompt, ``inputs_embeds``, pre-computed ``mm_encoder_outputs`` or a call continuing a
cache run unchanged, as does a prompt whose placeholders do not match its images (the model
raises its own error).

Example (a tiny random Gemma 3):

>>> import torch, tome
>>> _ = torch.manual_seed(0)  # random weights: a fixed draw, so that no end token cuts the answer short
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

from tome.adapters.common.vlm import VisualHandle, kept_tokens, reduce_images_tracked
from tome.adapters.common.vlm_call import install_visual, is_prompt, require, rewritten_call, shorten_call
from tome.runtime.registry import REDUCE_ONCE, Adapter

__all__ = ["apply"]

# Per-token inputs of forward() / generate() that lose the same positions as input_ids:
# token_type_ids makes the bidirectional block of each image, so it must shrink with it.
_PER_TOKEN = ("labels", "position_ids", "token_type_ids", "mm_token_type_ids")


# -- the rewrite (module-level: patched models pickle and deep-copy) -----------------------------


def _reduced(model: nn.Module, handle: VisualHandle, ids: object, kwargs: dict) -> tuple[dict, int] | None:
    """``kwargs`` rewritten: merged soft tokens as ``mm_encoder_outputs`` instead of
    ``pixel_values``, ``input_ids``, ``token_type_ids`` and the other per-token inputs shortened;
    and the new length. ``None``: run as is."""
    pixels = kwargs.get("pixel_values")
    if not is_prompt(handle, ids, kwargs) or not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
        return None
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
    shortened = shorten_call(model, handle, ids, kwargs, _PER_TOKEN, before, after, sources)
    if shortened is None:
        return None
    # Every image has the same number of soft tokens, so every one keeps the same number: the
    # (images, k, D) tensor Gemma 3 expects (and generate() repeats for beams).
    image.pooler_output = torch.stack(merged)
    return rewritten_call(kwargs, shortened, {"image": image})


# -- patching ---------------------------------------------------------------------------------------


def apply(model: nn.Module, **visual: object) -> VisualHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    require(
        model, "a Gemma 3", methods=("get_image_features",), ints=("image_token_id", "mm_tokens_per_image")
    )
    handle = VisualHandle(**visual)  # checks every option before the model changes
    return install_visual(handle, model, _reduced, model.model.language_model)


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
