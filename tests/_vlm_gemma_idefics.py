"""Tiny random Gemma 3, Idefics3 and SmolVLM models and their prompts, for
``test_patch_gemma3.py``, ``test_patch_idefics3.py`` (and the contract test's builders).

Token ids (a vocabulary of 100): 99 the image placeholder, 0 padding, 1 / 2 bos / eos;
Gemma 3 frames each image with ``BOI`` / ``EOI``; Idefics3 / SmolVLM frame each tile with
``FAKE`` (``<fake_token_around_image>``) and a ``<row_r_col_c>`` token (``ROW + 3 * r + c``), the
global image with ``FAKE GLOBAL``, and end each row of tiles with ``NEWLINE``, as their processors
do.
"""

from __future__ import annotations

import torch

IMAGE, PAD = 99, 0
BOI, EOI = 97, 96  # Gemma 3
FAKE, GLOBAL, ROW, NEWLINE = 97, 96, 60, 10  # Idefics3 / SmolVLM
GEMMA_TOKENS = 16  # mm_tokens_per_image: 8x8 patches average-pooled to 4x4
TILE_TOKENS = 16  # Idefics3 / SmolVLM: 8x8 patches, pixel shuffle by 2
SLIDING_WINDOW = 16
TEXT = {
    "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": PAD, "bos_token_id": 1,
    "eos_token_id": 2,
}  # fmt: skip
VISION = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "image_size": 32, "patch_size": 4,
}  # fmt: skip


def tiny_gemma3(seed: int = 0, sliding_window: int = SLIDING_WINDOW) -> torch.nn.Module:
    """SigLIP vision (32 px, patch 4) + Gemma 3 text (a sliding-window layer, then a global
    one): 16 soft tokens an image, bidirectional attention inside each image. The projector,
    which Gemma 3 initializes to zeros, gets random weights: else every image reads as zeros."""
    import transformers

    torch.manual_seed(seed)
    text = transformers.Gemma3TextConfig(
        **TEXT, head_dim=8, query_pre_attn_scalar=8, sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    config = transformers.Gemma3Config(
        vision_config=transformers.SiglipVisionConfig(**VISION),
        text_config=text,
        mm_tokens_per_image=GEMMA_TOKENS,
        boi_token_index=BOI,
        eoi_token_index=EOI,
        image_token_index=IMAGE,
    )
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.3)
    return model


def tiny_idefics3(family: str = "idefics3", seed: int = 0) -> torch.nn.Module:
    """Idefics3 or SmolVLM: a SigLIP-like vision tower (32 px tiles, patch 4), the pixel-shuffle
    connector (scale 2: 64 patches -> 16 tokens a tile), a Llama text model."""
    import transformers

    torch.manual_seed(seed)
    if family == "idefics3":
        config = transformers.Idefics3Config(
            vision_config=transformers.Idefics3VisionConfig(**VISION),
            text_config=transformers.LlamaConfig(**TEXT),
            scale_factor=2,
            image_token_id=IMAGE,
        )
        return transformers.Idefics3ForConditionalGeneration(config).eval()
    config = transformers.SmolVLMConfig(
        vision_config=transformers.SmolVLMVisionConfig(**VISION),
        text_config=transformers.LlamaConfig(**TEXT),
        scale_factor=2,
        image_token_id=IMAGE,
    )
    return transformers.SmolVLMForConditionalGeneration(config).eval()


def gemma_prompt(before: list[int], images: int, after: list[int]) -> list[int]:
    """``before``, then each image as ``BOI`` + 16 placeholders + ``EOI``, then ``after``."""
    return before + ([BOI] + [IMAGE] * GEMMA_TOKENS + [EOI]) * images + after


def idefics_image(rows: int, cols: int) -> list[int]:
    """One image as Idefics3's processor writes it: ``rows x cols`` tiles, each framed by
    ``FAKE <row_r_col_c>``, a newline after each row of tiles, then the global image framed by
    ``FAKE GLOBAL ... FAKE``; an image not split (0 x 0) is the global image alone."""
    if rows == 0:
        return [FAKE, GLOBAL] + [IMAGE] * TILE_TOKENS + [FAKE]
    ids: list[int] = []
    for r in range(rows):
        for c in range(cols):
            ids += [FAKE, ROW + 3 * r + c] + [IMAGE] * TILE_TOKENS
        ids.append(NEWLINE)
    return ids + [NEWLINE, FAKE, GLOBAL] + [IMAGE] * TILE_TOKENS + [FAKE]


def idefics_prompt(before: list[int], images: list[tuple[int, int]], after: list[int]) -> list[int]:
    ids = list(before)
    for rows, cols in images:
        ids += idefics_image(rows, cols)
    return ids + after


def tiles(images: list[tuple[int, int]]) -> int:
    """The tiles of ``images`` (crops and global images): the number of placeholder runs."""
    return sum(rows * cols + 1 for rows, cols in images)


def left_padded(prompts: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``prompts`` padded to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        span = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[row, span] = torch.tensor(prompt)
        mask[row, span] = 1
    return ids, mask


def gemma_batch(rows: list[tuple[list[int], int, list[int]]], seed: int = 1, types: bool = True) -> dict:
    """Gemma 3's processor inputs: the prompts left-padded, ``token_type_ids`` (1 on the
    placeholders), and one ``(3, 32, 32)`` image per image, in the order of the prompts."""
    ids, mask = left_padded([gemma_prompt(*row) for row in rows])
    images = sum(row[1] for row in rows)
    pixels = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    if types:
        inputs["token_type_ids"] = (ids == IMAGE).long()
    return inputs


def idefics_batch(rows: list[tuple[list[int], list[tuple[int, int]], list[int]]], seed: int = 1) -> dict:
    """Idefics3's processor inputs: the prompts left-padded; ``pixel_values`` ``(B, most tiles,
    3, 32, 32)``, each row's tiles (each image's crops, then its global image) and zeros after
    them (the padding tiles the model drops); ``pixel_attention_mask`` ``(B, most tiles, 32,
    32)``."""
    ids, mask = left_padded([idefics_prompt(*row) for row in rows])
    counts = [tiles(row[1]) for row in rows]
    g = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(len(rows), max(counts), 3, 32, 32)
    pixel_mask = torch.zeros(len(rows), max(counts), 32, 32, dtype=torch.long)
    for row, count in enumerate(counts):
        pixels[row, :count] = torch.randn(count, 3, 32, 32, generator=g)
        pixel_mask[row, :count] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "pixel_attention_mask": pixel_mask,
    }


def text_model(model: torch.nn.Module) -> torch.nn.Module:
    """The language model the adapter shortens the sequence for."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner.text_model


def language_model_lengths(model: torch.nn.Module, run) -> list[int]:
    """The sequence lengths the language model reads, call by call (the first: the prefill)."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"].shape[1])

    handle = text_model(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def attention_masks(model: torch.nn.Module, run) -> dict[int, list]:
    """The ``attention_mask`` each language-model attention layer receives, call by call
    (hooks registered after tome's: what the attention itself gets)."""
    seen: dict[int, list] = {}
    layers = text_model(model).layers
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: seen.setdefault(i, []).append(kwargs["attention_mask"]),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen
