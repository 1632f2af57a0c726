"""transformers ``LlavaOnevisionForConditionalGeneration`` and
``LlavaNextVideoForConditionalGeneration``: reduce once, before the decoder (images and videos).

Images: as LLaVA-NeXT (:mod:`tome.adapters.transformers_llava_next`): each image's packed AnyRes
features (base image and crops, one set) merged to :func:`~tome.adapters.common.vlm.kept_tokens`
``(n)`` tokens, its row newlines kept as one newline of size ``R``
(:func:`tome.adapters.common.anyres.reduce_packed`).

Videos (``pixel_values_videos``, ``(videos, frames, 3, H, W)``): each frame goes through the
vision tower and is pooled (OneVision: bilinear to half the side; NeXT-Video: its
``vision_resampler``), so a video's features are ``frames x S`` tokens in raster order, then,
for OneVision, one ``image_newline`` (the video's end). Every video keeps
:func:`~tome.adapters.common.video.kept_video_tokens` of its ``frames * S`` frame tokens
(all but ``video_ratio`` of them): merged across frames first (a still region becomes one token
whose size counts the frames it covers; a cut, a frame unlike the one before, starts a new
segment and no merge crosses it), then inside each frame (:mod:`tome.adapters.common.video`).
OneVision's newline stays out of the merge, last, as it was (it marks the end of the video, not
a picture: the image path's rule). The prompt's run of ``video_token_id`` placeholders is cut to
match; each video merges by its own similarities, so a row does not depend on its batch.
Images and videos are set separately: ``tome.patch(vlm, visual_tokens=64, video_ratio=0.9)``.

Positions: 1-D RoPE (Qwen2, Llama, Mistral language models), numbered consecutively over the
shorter sequence, as for every LLaVA: the language model sees a video of ``k`` tokens, as if the
vision side had produced that many (these models give no token a time of its own: the order of
the merged tokens, a run at the frame where it starts, is all the time they read).

What is installed on the top model (module-level functions: a patched model deep-copies and
pickles; ``tome.unpatch`` takes it all away): ``generate`` (an instance method shadowing the
class's: it computes the image and video features once with the model's own
``get_image_features`` / ``get_video_features``, merges them and calls the class's ``generate``
with them as ``mm_encoder_outputs``), a forward pre-hook doing the same for a direct
``model(...)`` call (``labels`` shortened too), and the proportional-attention pre-hooks on the
language model's attention layers (``visual_prop_attn``: merged video tokens too).

Merged only when ``input_ids`` and ``pixel_values`` with ``image_sizes`` (images) or a 5-D
``pixel_values_videos`` (videos) are given; a text-only prompt, ``inputs_embeds`` or
pre-computed ``mm_encoder_outputs`` run unchanged, as does a prompt whose placeholders do not
match its images or videos (the model raises its own error).

Example (a tiny random LLaVA-NeXT-Video: 16 px frames of 4 px patches, 16 tokens a frame):

>>> import torch, tome
>>> _ = torch.manual_seed(0)  # random weights: a fixed draw, so that no end token cuts the answer short
>>> from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig,
...                           LlavaNextVideoForConditionalGeneration)
>>> vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                           num_attention_heads=2, image_size=16, patch_size=4)
>>> text = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
>>> config = LlavaNextVideoConfig(vision_config=vision, text_config=text, image_token_index=99,
...                               video_token_index=98, spatial_pool_stride=1,
...                               image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
>>> model = LlavaNextVideoForConditionalGeneration(config).eval()
>>> ids = torch.tensor([[1, 5] + [98] * 4 * 16 + [7]])  # a video of 4 frames x 16 tokens
>>> inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
...           "pixel_values_videos": torch.randn(1, 4, 3, 16, 16)}
>>> model = tome.patch(model, video_ratio=0.75)
>>> out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
>>> out.sequences.shape, out.cache.get_seq_length()  # prompt as given; the cache: 2 + 16 + 1 + 2
(torch.Size([1, 70]), 21)
>>> tome.unpatch(model) is model
True
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters.common.anyres import rewrite_anyres
from tome.adapters.common.video import VideoVisualHandle, forward_reduced_videos
from tome.adapters.common.vlm_call import install_visual, require
from tome.runtime.registry import REDUCE_ONCE, Adapter

__all__ = ["apply"]


# -- patching ---------------------------------------------------------------------------------------


def apply(model: nn.Module, **visual: object) -> VideoVisualHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    require(
        model,
        "a LLaVA-OneVision / LLaVA-NeXT-Video",
        methods=("get_image_features", "get_video_features"),
        ints=("image_token_id", "video_token_id"),
    )
    if not isinstance(getattr(model.model, "image_newline", None), torch.Tensor):
        raise TypeError(
            f"tome: expected a LLaVA-OneVision / LLaVA-NeXT-Video model with model.image_newline, got a {type(model).__name__}"
        )
    handle = VideoVisualHandle(**visual)  # checks every option before the model changes
    return install_visual(
        handle, model, rewrite_anyres, model.model.language_model, runner=forward_reduced_videos
    )


ADAPTER = Adapter(
    patches=(
        "transformers.LlavaOnevisionForConditionalGeneration",
        "transformers.LlavaNextVideoForConditionalGeneration",
    ),
    apply=apply,
    kind=REDUCE_ONCE,
    handle=VideoVisualHandle,
    title=(
        "vision-language models with videos (transformers LlavaOnevisionForConditionalGeneration, "
        "LlavaNextVideoForConditionalGeneration)"
    ),
    merged=(
        "each image's packed visual tokens (the row newlines kept as one) and each video's tokens "
        "across frames, then inside each frame (OneVision's newline kept), once, before the "
        "language model: shorter prefill and KV cache"
    ),
    tested_on="tiny random configs (SigLIP vision + Qwen2; CLIP vision + Llama)",
    schedule=("visual_tokens", "visual_ratio", "video_ratio"),
)
