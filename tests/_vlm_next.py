"""Tiny random AnyRes vision-language models (LLaVA-NeXT, LLaVA-OneVision) and their inputs, for
``test_patch_llava_next.py`` (and the contract test's builder).

Crops are 16 px of 4 px patches: 16 tokens each; ``image_grid_pinpoints`` allow 1x2, 2x1 and 2x2
grids, so an image's packed token count depends on its size (36 to 88 tokens here)."""

from __future__ import annotations

import torch
from _vlm import IMAGE, PAD, TEXT, VIDEO

CROP = 16  # px: the vision tower's image size
PINS = [[16, 32], [32, 16], [32, 32]]


def tiny_llava_next(seed: int = 0) -> torch.nn.Module:
    """CLIP vision (CLS dropped: the "default" strategy) + Llama."""
    import transformers

    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=CROP,
        patch_size=4,
    )  # fmt: skip
    config = transformers.LlavaNextConfig(
        vision_config=vision,
        text_config=transformers.LlamaConfig(**TEXT),
        image_token_index=IMAGE,
        image_grid_pinpoints=PINS,
    )
    return transformers.LlavaNextForConditionalGeneration(config).eval()


def tiny_onevision(seed: int = 0) -> torch.nn.Module:
    """SigLIP vision (no CLS: the "full" strategy) + Qwen2; ``anyres_max_1``, so that a crop grid
    of more than one crop's area is shrunk (OneVision's interpolation) before the newlines."""
    import transformers

    torch.manual_seed(seed)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=CROP,
        patch_size=4,
    )  # fmt: skip
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=transformers.Qwen2Config(**TEXT),
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        image_grid_pinpoints=PINS,
        vision_aspect_ratio="anyres_max_1",
    )
    return transformers.LlavaOnevisionForConditionalGeneration(config).eval()


def is_onevision(model: torch.nn.Module) -> bool:
    return type(model).__name__.startswith("LlavaOnevision")


@torch.no_grad()
def anyres_batch(model: torch.nn.Module, rows: list[list], seed: int = 1, side: str = "left") -> dict:
    """The processor's inputs for ``rows``: each a list of token ids and image sizes
    (``(height, width)`` tuples, one image's placeholders each, as many as the model packs for
    it); padded to the longest row; ``pixel_values`` ``(images, most crops, 3, 16, 16)`` (zeros
    past an image's crops, as the processor pads), ``image_sizes``, and for OneVision
    ``batch_num_images`` (a row of several images gets no crops: OneVision's rule)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = [item for row in rows for item in row if isinstance(item, tuple)]
    inputs: dict = {}
    if sizes:
        crops = [image_size_to_num_patches(size, PINS, CROP) for size in sizes]
        pixels = torch.zeros(len(sizes), max(crops), 3, CROP, CROP)
        g = torch.Generator().manual_seed(seed)
        for i, n in enumerate(crops):
            pixels[i, :n] = torch.randn(n, 3, CROP, CROP, generator=g)
        inputs = {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}
        if is_onevision(model):
            inputs["batch_num_images"] = torch.tensor(
                [sum(isinstance(x, tuple) for x in row) for row in rows]
            )
        counts = iter(image_token_counts(model, inputs))
    prompts = [
        [t for x in row for t in ([IMAGE] * next(counts) if isinstance(x, tuple) else [x])] for row in rows
    ]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        span = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[row, span] = torch.tensor(prompt)
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask, **inputs}


@torch.no_grad()
def image_token_counts(model: torch.nn.Module, inputs: dict) -> list[int]:
    """How many tokens the model packs for each image of ``inputs`` (its own get_image_features)."""
    names = ("pixel_values", "image_sizes", "batch_num_images")
    image = model.get_image_features(**{k: inputs[k] for k in names if k in inputs}, return_dict=True)
    return [f.shape[0] for f in image.pooler_output]


def row_inputs(model: torch.nn.Module, rows: list[list], row: int, seed: int = 1) -> dict:
    """``anyres_batch(model, rows)``'s row ``row`` alone: its prompt unpadded, its images."""
    inputs = anyres_batch(model, rows, seed)
    images = [sum(isinstance(x, tuple) for x in r) for r in rows]
    first, count = sum(images[:row]), images[row]
    keep = inputs["attention_mask"][row].bool()
    alone = {
        "input_ids": inputs["input_ids"][row, keep][None],
        "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long),
    }
    if count:
        alone["pixel_values"] = inputs["pixel_values"][first : first + count]
        alone["image_sizes"] = inputs["image_sizes"][first : first + count]
        if "batch_num_images" in inputs:
            alone["batch_num_images"] = torch.tensor([count])
    return alone


# -- videos (LLaVA-OneVision, LLaVA-NeXT-Video) ---------------------------------------------------


def tiny_next_video(seed: int = 0) -> torch.nn.Module:
    """LLaVA-NeXT-Video: CLIP vision (CLS dropped) + Llama, images as ``tiny_llava_next``; videos:
    16 px frames, ``spatial_pool_stride=1`` (the resampler keeps 4 x 4 tokens a frame)."""
    import transformers

    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=CROP,
        patch_size=4,
    )  # fmt: skip
    config = transformers.LlavaNextVideoConfig(
        vision_config=vision,
        text_config=transformers.LlamaConfig(**TEXT),
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        image_grid_pinpoints=PINS,
        spatial_pool_stride=1,
    )
    return transformers.LlavaNextVideoForConditionalGeneration(config).eval()


def video_tokens(model: torch.nn.Module, frames: int) -> tuple[int, int]:
    """``(tokens a frame, trailing newlines)`` of a video: OneVision pools 4 x 4 to 2 x 2 and ends
    each video with a newline; ``tiny_next_video`` keeps 4 x 4 and has none."""
    return (4, 1) if is_onevision(model) else (16, 0)


def video_clip(shots: list[int], seed: int, noise: float = 0.0) -> torch.Tensor:
    """``(frames, 3, 16, 16)``: frames with the same shot number show the same picture (plus
    ``noise``); a new number is a cut."""
    g = torch.Generator().manual_seed(seed)
    pictures = {s: torch.randn(3, CROP, CROP, generator=g) for s in sorted(set(shots))}
    return torch.stack([pictures[s] + noise * torch.randn(3, CROP, CROP, generator=g) for s in shots])


@torch.no_grad()
def video_batch(model: torch.nn.Module, rows: list[dict]) -> dict:
    """The processor's inputs for rows ``{"text": [...], "image": (h, w) or None, "video": shots
    or None, "after": [...], "seed": int}`` (every row's pixels from its own seed, so that a row
    built alone has the same pixels), left padded. All videos of a batch have as many frames."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = [row["image"] for row in rows if row.get("image")]
    inputs: dict = {}
    counts: list[int] = []
    if sizes:
        crops = [image_size_to_num_patches(size, PINS, CROP) for size in sizes]
        pixels = torch.zeros(len(sizes), max(crops), 3, CROP, CROP)
        seeds = [row["seed"] for row in rows if row.get("image")]
        for i, (n, seed) in enumerate(zip(crops, seeds, strict=True)):
            pixels[i, :n] = torch.randn(n, 3, CROP, CROP, generator=torch.Generator().manual_seed(seed))
        inputs = {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}
        if is_onevision(model):
            inputs["batch_num_images"] = torch.tensor([int(bool(row.get("image"))) for row in rows])
        counts = image_token_counts(model, inputs)
    clips = [
        video_clip(row["video"], row["seed"] + 100, row.get("noise", 0.0)) for row in rows if row.get("video")
    ]
    if clips:
        inputs["pixel_values_videos"] = torch.stack(clips)
    images = iter(counts)
    prompts = []
    for row in rows:
        ids = list(row["text"])
        if row.get("image"):
            ids += [IMAGE] * next(images)
        if row.get("video"):
            per_frame, newline = video_tokens(model, len(row["video"]))
            ids += [VIDEO] * (per_frame * len(row["video"]) + newline)
        prompts.append(ids + list(row.get("after", [7, 8])))
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt) :] = torch.tensor(prompt)
        mask[r, width - len(prompt) :] = 1
    return {"input_ids": ids, "attention_mask": mask, **inputs}
