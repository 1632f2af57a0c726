"""Tiny random InternVL and Qwen3-VL models and their prompt batches, for
``test_patch_internvl.py``, ``test_patch_qwen3_vl.py`` (and ``test_contract.py``'s builders)."""

from __future__ import annotations

import torch
from _vlm import END, IMAGE, PAD, QWEN_TOKENS, START, TEXT, VIDEO

TILE = 16  # InternVL: tokens a tile (32 px, patch 4: 8 x 8 patches, pixel shuffle 0.5: 4 x 4)
PATCH = 3 * 2 * 4 * 4  # Qwen3-VL: a flattened patch, channels x temporal_patch_size x patch_size ** 2


def tiny_internvl(seed: int = 0) -> torch.nn.Module:
    """InternVL vision (32 px tiles, patch 4, CLS dropped, pixel shuffle) + MLP projector + Qwen2."""
    import transformers

    torch.manual_seed(seed)
    vision = transformers.InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=4,
    )  # fmt: skip
    config = transformers.InternVLConfig(
        vision_config=vision,
        text_config=transformers.Qwen2Config(**TEXT),
        image_token_id=IMAGE,
        image_seq_length=TILE,
    )
    return transformers.InternVLForConditionalGeneration(config).eval()


def tiny_qwen3(seed: int = 0, deepstack: tuple[int, ...] = (0, 1)) -> torch.nn.Module:
    """Qwen3-VL: patch 4, the 2x2 patch merger, DeepStack from vision layers ``deepstack`` (of 3)
    into the language model's first layers (of 3), interleaved M-RoPE."""
    import transformers

    torch.manual_seed(seed)
    vision = {
        "depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
        "patch_size": 4, "temporal_patch_size": 2, "num_position_embeddings": 16,
        "deepstack_visual_indexes": list(deepstack),
    }  # fmt: skip
    text = {
        **TEXT,
        "num_hidden_layers": 3,
        "head_dim": 8,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4},
    }
    config = transformers.Qwen3VLConfig(vision_config=vision, text_config=text, **QWEN_TOKENS)
    return transformers.Qwen3VLForConditionalGeneration(config).eval()


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


# -- InternVL: a row is (text before, tiles of each image, text after) -------------------------------


def internvl_prompt(before: list[int], tiles: list[int], after: list[int]) -> list[int]:
    ids = list(before)
    for count in tiles:
        ids += [START] + [IMAGE] * (TILE * count) + [END]
    return ids + after


def internvl_batch(rows: list[tuple[list[int], list[int], list[int]]], seed: int = 1) -> dict:
    """The processor's inputs: the prompts left-padded, every image's tiles in ``pixel_values``."""
    ids, mask = _left_pad([internvl_prompt(*row) for row in rows])
    tiles = sum(sum(row[1]) for row in rows)
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(tiles, 3, 32, 32, generator=g),
    }


# -- Qwen3-VL: a row is (text before, (t, h, w) patch grid of each image, text after) ----------------


def qwen3_tokens(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // 4  # the 2x2 patch merger


def qwen3_prompt(before: list[int], grids: list[tuple[int, int, int]], after: list[int]) -> list[int]:
    ids = list(before)
    for grid in grids:
        ids += [START] + [IMAGE] * qwen3_tokens(grid) + [END]
    return ids + after


def qwen3_batch(
    rows: list[tuple[list[int], list[tuple[int, int, int]], list[int]]], seed: int = 1, types: bool = True
) -> dict:
    """The processor's inputs: the prompts left-padded to the longest, their images' patches."""
    ids, mask = _left_pad([qwen3_prompt(*row) for row in rows])
    grids = [grid for row in rows for grid in row[1]]
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(sum(t * h * w for t, h, w in grids), PATCH, generator=g),
        "image_grid_thw": torch.tensor(grids),
    }
    if types:
        inputs["mm_token_type_ids"] = (ids == IMAGE).int()
    return inputs


def attention_masks(model: torch.nn.Module, run) -> dict[int, list]:
    """The attention_mask every language-model attention receives (after tome's hook), call by call."""
    seen: dict[int, list] = {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: seen.setdefault(i, []).append(kwargs["attention_mask"]),
            with_kwargs=True,
        )
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def check_log_sizes(seen: dict[int, list], short: torch.Tensor, log_sizes: torch.Tensor, steps: int) -> None:
    """Every layer's mask, in the prefill and each of ``steps - 1`` decode steps: ``log_sizes`` on
    the shortened prompt's placeholders ``short == IMAGE`` (in order), 0 on every other allowed
    key, and the disallowed keys (padding, the future) masked."""
    B, P = short.shape
    expected = torch.zeros(short.shape)
    expected[short == IMAGE] = log_sizes
    real = short != PAD
    for masks in seen.values():
        assert len(masks) == steps
        for step, got in enumerate(masks):
            Q, K = (P, P) if step == 0 else (1, P + step)
            assert got.shape == (B, 1, Q, K) and got.is_floating_point()
            queries = torch.arange(K - Q, K)[:, None]
            allowed = (torch.arange(K)[None, :] <= queries)[None] & torch.cat(
                [real, torch.ones(B, step, dtype=torch.bool)], 1
            )[:, None, :]
            bias = torch.cat([expected, torch.zeros(B, step)], 1)[:, None, :].expand(B, Q, K)
            assert torch.equal(got[:, 0][allowed], bias[allowed])
            assert bool((got[:, 0][~allowed] < -1e30).all())


def kept_prompt(prompt: list[int], keeps: list[int], width: int) -> list[int]:
    """``prompt`` with image ``i``'s run of placeholders cut to its first ``keeps[i]``, left-padded
    to ``width``."""
    out, image, run = [], -1, 0
    for index, token in enumerate(prompt):
        if token == IMAGE:
            if index == 0 or prompt[index - 1] != IMAGE:
                image, run = image + 1, 0
            run += 1
            if run > keeps[image]:
                continue
        out.append(token)
    return [PAD] * (width - len(out)) + out


# -- Qwen3-VL videos: a timestamp, then each frame group's own run of placeholders -----------------

TIMESTAMP = 60  # a text token standing for the processor's "<t seconds>" before each frame group


def qwen3_video_batch(rows: list[dict]) -> dict:
    """The processor's inputs for rows ``{"text": [...], "image": (h, w) or None, "video": (shots,
    (h, w)) or None, "after": [...], "seed": int, "noise": float}``: an image as
    ``START, IMAGE * n, END``; a video of ``len(shots)`` temporal groups as, per group,
    ``TIMESTAMP + g, START, VIDEO * (h * w / 4), END`` (Qwen3-VL's layout); groups with the same
    shot number show the same picture (plus ``noise``), a new number is a cut. Every row's
    pixels come from its own seed, so that a row built alone has the same pixels. Left padded."""
    prompts, images, grids_i, videos, grids_v = [], [], [], [], []
    for row in rows:
        g = torch.Generator().manual_seed(row["seed"])
        ids = list(row["text"])
        if row.get("image"):
            h, w = row["image"]
            ids += [START] + [IMAGE] * (h * w // 4) + [END]
            images.append(torch.randn(h * w, PATCH, generator=g))
            grids_i.append((1, h, w))
        if row.get("video"):
            shots, (h, w) = row["video"]
            for t in range(len(shots)):
                ids += [TIMESTAMP + t, START] + [VIDEO] * (h * w // 4) + [END]
            pictures = {s: torch.randn(h * w, PATCH, generator=g) for s in sorted(set(shots))}
            noise = row.get("noise", 0.0)
            videos.append(
                torch.cat([pictures[s] + noise * torch.randn(h * w, PATCH, generator=g) for s in shots])
            )
            grids_v.append((len(shots), h, w))
        prompts.append(ids + list(row.get("after", [7, 8])))
    ids, mask = _left_pad(prompts)
    inputs = {"input_ids": ids, "attention_mask": mask}
    inputs["mm_token_type_ids"] = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    if images:
        inputs.update(pixel_values=torch.cat(images), image_grid_thw=torch.tensor(grids_i))
    if videos:
        inputs.update(pixel_values_videos=torch.cat(videos), video_grid_thw=torch.tensor(grids_v))
    return inputs
