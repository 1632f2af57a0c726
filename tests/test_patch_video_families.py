"""Videos in Qwen3-VL, LLaVA-OneVision and LLaVA-NeXT-Video (issue 25): each video's tokens merged
across frames first, then inside each frame (tome/adapters/common/video.py), on tiny random
configs: exactness when nothing merges, the prefill and KV cache shorter by exactly the removed
tokens, no merge across a planted cut, images and videos set separately, batch invariance with a
video and an image in different rows, proportional attention, unpatch / copies / pickles; Qwen3-VL:
each frame group's run of placeholders (timestamps between them), DeepStack, M-RoPE positions.
"""

from __future__ import annotations

import pytest
import torch

import tome
from tome.adapters.common.anyres import reduce_packed_videos
from tome.adapters.common.mrope import original_positions
from tome.adapters.common.video import group_counts, kept_video_tokens, merge_video

transformers = pytest.importorskip("transformers")
for _name in ("Qwen3VLForConditionalGeneration", "LlavaOnevisionForConditionalGeneration", "LlavaNextVideoForConditionalGeneration"):  # fmt: skip
    if not hasattr(transformers, _name):
        pytest.skip(f"no {_name} in this transformers", allow_module_level=True)

from _vlm import IMAGE, VIDEO, check_copies_and_unpatch, language_model_calls  # noqa: E402
from _vlm_internvl_qwen3 import attention_masks, qwen3_video_batch, tiny_qwen3  # noqa: E402
from _vlm_next import image_token_counts, tiny_next_video, tiny_onevision, video_batch, video_tokens  # noqa: E402

from tome.adapters.transformers_qwen3_vl import merge_like  # noqa: E402

GREEDY = {"max_new_tokens": 3, "do_sample": False}
FAMILIES = {"qwen3": tiny_qwen3, "onevision": tiny_onevision, "next_video": tiny_next_video}
SHOTS = [0, 0, 0, 1, 1, 1]  # a still shot, then a cut to another


def _rows(family: str, rows: list[dict]) -> list[dict]:
    """Family-neutral rows (``image``: True, ``video``: shots) in the family's own terms."""
    out = []
    for row in rows:
        row = dict(row)
        if family == "qwen3":
            row["image"] = (8, 12) if row.get("image") else None
            row["video"] = (row["video"], (8, 8)) if row.get("video") else None
        else:
            row["image"] = (32, 32) if row.get("image") else None
        out.append(row)
    return out


def _batch(model, family: str, rows: list[dict]) -> dict:
    rows = _rows(family, rows)
    return qwen3_video_batch(rows) if family == "qwen3" else video_batch(model, rows)


def _frame_tokens(model, family: str, frames: int) -> tuple[int, int]:
    """``(frame tokens of a video, trailing tokens kept out of the merge)``."""
    if family == "qwen3":
        return frames * 16, 0
    per_frame, newline = video_tokens(model, frames)
    return per_frame * frames, newline


def _video_features(model, family: str, inputs: dict) -> list[torch.Tensor]:
    if family == "qwen3":
        out = model.get_video_features(
            pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"]
        )
    else:
        out = model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"], return_dict=True)
    return list(out.pooler_output)


def _generate(model, inputs: dict):
    return model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True)


def _prefill_embeds(model, run) -> torch.Tensor:
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw), with_kwargs=True
    )
    try:
        run()
    finally:
        hook.remove()
    return seen[0]


VIDEO_ROW = {"text": [1, 5, 6], "video": SHOTS, "seed": 3, "noise": 0.02}
IMAGE_ROW = {"text": [1, 11], "image": True, "seed": 4, "after": [9]}
BOTH_ROW = {"text": [1, 12, 13], "image": True, "video": [0, 0, 1, 1, 1, 2], "seed": 5, "noise": 0.05}


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", [{"video_ratio": 0.0}, {"video_ratio": None}])
def test_no_video_merging_is_exact(family, settings):
    model = FAMILIES[family]()
    inputs = _batch(model, family, [VIDEO_ROW])
    logits = model(**inputs).logits
    reference = _generate(model, inputs)
    tome.patch(model, **settings)
    assert torch.equal(model(**inputs).logits, logits)
    out = _generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_the_prefill_and_the_cache_shrink_by_exactly_the_removed_tokens(family, ratio):
    model = tome.patch(FAMILIES[family](), video_ratio=ratio)
    inputs = _batch(model, family, [VIDEO_ROW])
    n, _ = _frame_tokens(model, family, len(SHOTS))
    removed = n - kept_video_tokens(n, ratio)
    width = inputs["input_ids"].shape[1]
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert [c["length"] for c in calls] == [width - removed] + [1] * (GREEDY["max_new_tokens"] - 1)
    out = _generate(model, inputs)
    assert out.cache.get_seq_length() == width - removed + GREEDY["max_new_tokens"] - 1
    assert torch.equal(out.sequences[:, :width], inputs["input_ids"])
    # a direct forward with a video and no image reads the shortened prompt too
    assert model(**inputs).logits.shape[1] == width - removed


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_no_merge_crosses_a_planted_cut_and_the_model_reads_that_merge(family):
    model = FAMILIES[family]()
    inputs = _batch(model, family, [VIDEO_ROW])
    features = _video_features(model, family, inputs)[0]
    n, trailing = _frame_tokens(model, family, len(SHOTS))
    out = merge_video(features[:n], len(SHOTS), kept_video_tokens(n, 0.9))
    assert out.segments.tolist() == [0, 0, 0, 1, 1, 1]  # the planted cut is found
    for j in range(out.features.shape[0]):
        assert len(set(out.segment_of_token[out.source == j].tolist())) == 1
    assert out.sizes.max() >= 3  # still regions merged across frames
    tome.patch(model, video_ratio=0.9)
    seen = _prefill_embeds(model, lambda: _generate(model, inputs))
    embeds = seen["inputs_embeds"][0]
    expected = torch.cat([out.features, features[n:]])  # OneVision: the newline, last, as it was
    assert embeds.shape[0] == inputs["input_ids"].shape[1] - (n - out.features.shape[0])
    read = embeds[3 : 3 + expected.shape[0]] if family != "qwen3" else None
    if family == "qwen3":  # the video positions of the shortened prompt, between its timestamps
        read = embeds[_short_ids(inputs, out.source, len(SHOTS))[0] == VIDEO]
    torch.testing.assert_close(read, expected)
    assert trailing == (1 if family == "onevision" else 0)


def _short_ids(inputs: dict, source: torch.Tensor, groups: int) -> torch.Tensor:
    """Qwen3-VL: the prompt with each frame group's run cut to the merged tokens starting in it."""
    keep = iter(group_counts(source, groups))
    ids, out, left = inputs["input_ids"][0].tolist(), [], 0
    for i, token in enumerate(ids):
        if token == VIDEO:
            if ids[i - 1] != VIDEO:
                left = next(keep)
            if left <= 0:
                continue
            left -= 1
        out.append(token)
    return torch.tensor([out])


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_images_and_videos_are_set_separately(family):
    model = FAMILIES[family]()
    inputs = _batch(model, family, [BOTH_ROW])
    n, _ = _frame_tokens(model, family, 6)
    images = int((inputs["input_ids"] == IMAGE).sum())
    width = inputs["input_ids"].shape[1]
    tome.patch(model, visual_tokens=8, video_ratio=0.9)
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert calls[0]["length"] == width - (images - 8) - (n - kept_video_tokens(n, 0.9))
    model.tome.video_ratio = None  # the images alone
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert calls[0]["length"] == width - (images - 8)
    tome.patch(model, visual_tokens=None, visual_ratio=None, video_ratio=0.5)  # the videos alone
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert calls[0]["length"] == width - (n - kept_video_tokens(n, 0.5))


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_each_row_is_its_own_run_with_a_video_and_an_image_in_different_rows(family):
    model = tome.patch(FAMILIES[family](), visual_tokens=6, video_ratio=0.8)
    rows = [IMAGE_ROW, VIDEO_ROW, BOTH_ROW]
    inputs = _batch(model, family, rows)
    together = _generate(model, inputs)
    width = inputs["input_ids"].shape[1]
    for r, row in enumerate(rows):
        alone_inputs = _batch(model, family, [row])
        alone = _generate(model, alone_inputs)
        own = alone.sequences[0, alone_inputs["input_ids"].shape[1] :]
        assert torch.equal(together.sequences[r, width:][: len(own)], own)
        torch.testing.assert_close(together.logits[0][r], alone.logits[0][0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_video_tokens_sizes_reach_every_layer(family):
    model = FAMILIES[family]()
    inputs = _batch(model, family, [VIDEO_ROW])
    features = _video_features(model, family, inputs)[0]
    n, trailing = _frame_tokens(model, family, len(SHOTS))
    out = merge_video(features[:n], len(SHOTS), kept_video_tokens(n, 0.9))
    sizes = torch.cat([out.sizes, torch.ones(trailing)])
    tome.patch(model, video_ratio=0.9)
    seen = attention_masks(model, lambda: _generate(model, inputs))
    short = inputs["input_ids"][0]
    if family == "qwen3":
        short = _short_ids(inputs, out.source, len(SHOTS))[0]
    else:
        short = torch.cat([short[:3], short[3 : 3 + sizes.shape[0]], short[3 + n + trailing :]])
    assert len(seen) == len(model.model.language_model.layers)
    for masks in seen.values():
        assert len(masks) == GREEDY["max_new_tokens"]
        for mask in masks:  # the prefill and every decode step: log(size) on the video's keys
            last = mask[0, 0, -1, : short.shape[0]]
            torch.testing.assert_close(last[short == VIDEO], sizes.log())
            assert torch.equal(last[short != VIDEO], torch.zeros(int((short != VIDEO).sum())))


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_video_unpatch_copies_and_pickles(family):
    model = FAMILIES[family]()
    inputs = _batch(model, family, [VIDEO_ROW, IMAGE_ROW])
    check_copies_and_unpatch(model, lambda m: _generate(m, inputs), video_ratio=0.9)


# -- Qwen3-VL: frame-group runs, DeepStack, positions ---------------------------------------------


@torch.no_grad()
def test_qwen3_deepstack_and_positions_follow_the_video_merge():
    model = tiny_qwen3()
    inputs = qwen3_video_batch(_rows("qwen3", [VIDEO_ROW]))
    video = model.get_video_features(
        pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"]
    )
    out = merge_video(video.pooler_output[0], len(SHOTS), kept_video_tokens(96, 0.9))
    counts = group_counts(out.source, len(SHOTS))
    assert counts[0] > 0 and sum(counts) == out.features.shape[0] and 0 in counts  # empty runs
    full = original_positions(model, inputs["input_ids"], inputs, True, forward_without_types="refuse")
    tome.patch(model, video_ratio=0.9)
    seen = _prefill_embeds(model, lambda: _generate(model, inputs))
    k = out.features.shape[0]
    levels = [merge_like([level[0]], [out.source], [k])[0] for level in video.deepstack_features]
    assert len(seen["deepstack_visual_embeds"]) == len(levels) == 2
    for got, want in zip(seen["deepstack_visual_embeds"], levels, strict=True):
        torch.testing.assert_close(got, want)  # every level merged with the main features' groups
    short = _short_ids(inputs, out.source, len(SHOTS))[0]
    assert torch.equal(seen["visual_pos_masks"][0], short == VIDEO)
    positions = seen["position_ids"][1:, 0]  # (t, h, w) of the shortened prompt
    ids = inputs["input_ids"][0]
    members = full[:, 0, ids == VIDEO].double()
    expected = torch.stack([members[:, out.source == j].mean(1).round() for j in range(k)], 1).long()
    assert torch.equal(positions[:, short == VIDEO], expected)
    text = full[:, 0, ids != VIDEO]
    assert torch.equal(positions[:, short != VIDEO], text)  # timestamps and text keep their own


def test_the_video_families_take_video_ratio_and_llava_next_refuses_it():
    from _vlm_next import tiny_llava_next

    for build in FAMILIES.values():
        model = tome.patch(build(), visual_tokens=64, video_ratio=0.9)
        assert type(model.tome).__name__ == "VideoVisualHandle"
        assert (model.tome.visual_tokens, model.tome.video_ratio) == (64, 0.9)
        with pytest.raises(ValueError, match=r"video_ratio: expected a number in \[0, 1\)"):
            model.tome.video_ratio = 1.0
    with pytest.raises(TypeError, match="video_ratio: an option of"):
        tome.patch(tiny_llava_next(), video_ratio=0.9)


def test_reduce_packed_videos_keeps_the_newline_out():
    newline = torch.full((8,), 3.0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    video = torch.cat([a, a, a, b, b, newline[None]])  # 5 frames of 4 tokens, a cut, the newline
    merged, sources = reduce_packed_videos([video], 5, newline, 0.75)
    assert merged[0].shape[0] == kept_video_tokens(20, 0.75) + 1
    assert torch.equal(merged[0][-1], newline) and sources[0][-1] == merged[0].shape[0] - 1
    assert int((sources[0] == merged[0].shape[0] - 1).sum()) == 1  # the newline holds itself only
    with pytest.raises(ValueError, match="does not split into 3 frames"):
        reduce_packed_videos([video], 3, newline, 0.5)
    plain, _ = reduce_packed_videos([video[:-1]], 5, newline, None)  # NeXT-Video: no newline
    assert torch.equal(plain[0], video[:-1])
    assert image_token_counts is not None
