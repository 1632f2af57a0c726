"""Videos in vision-language models: each video's tokens merged across its frame groups first,
then inside each segment (tome/adapters/common/video.py), on tiny random Qwen2.5-VL / Qwen2-VL
configs: exactness when nothing merges, the prefill and KV cache shorter by the merged tokens,
no merge across a planted cut, M-RoPE positions, batch invariance with a video and an image in
different rows, proportional attention, unpatch / copies / pickles.
"""

from __future__ import annotations

import pytest
import torch

import tome
from tome.adapters.common.video import (
    centred_units,
    find_cuts,
    group_counts,
    group_quotas,
    kept_video_tokens,
    merge_video,
    temporal_runs,
)

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip("no Qwen2.5-VL in this transformers", allow_module_level=True)

from _vlm import (  # noqa: E402
    END,
    IMAGE,
    PAD,
    START,
    VIDEO,
    check_copies_and_unpatch,
    language_model_calls,
    tiny_qwen,
)

PATCH = 3 * 2 * 4 * 4  # channels x temporal_patch_size x patch_size ** 2
GREEDY = {"max_new_tokens": 4, "do_sample": False}


def _clip(shots: list[int], hw: tuple[int, int] = (8, 8), seed: int = 0, noise: float = 0.0) -> torch.Tensor:
    """Patches of a clip of ``len(shots)`` temporal groups: groups with the same shot number show
    the same picture (plus ``noise``), a new number is a cut. ``(T * h * w, PATCH)``."""
    g = torch.Generator().manual_seed(seed)
    pictures = {shot: torch.randn(hw[0] * hw[1], PATCH, generator=g) for shot in sorted(set(shots))}
    return torch.cat([pictures[s] + noise * torch.randn(hw[0] * hw[1], PATCH, generator=g) for s in shots])


def _video_batch(rows: list[dict], seed: int = 1) -> dict:
    """Rows of ``{"text": [...], "video": (shots, (h, w)) or None, "image": (h, w) or None,
    "after": [...]}``, left padded; the processor's inputs."""
    prompts, videos, grids_v, images, grids_i = [], [], [], [], []
    g = torch.Generator().manual_seed(seed)
    for i, row in enumerate(rows):
        ids = list(row["text"])
        if row.get("image") is not None:
            h, w = row["image"]
            ids += [START] + [IMAGE] * (h * w // 4) + [END]
            images.append(torch.randn(h * w, PATCH, generator=g))
            grids_i.append((1, h, w))
        if row.get("video") is not None:
            shots, (h, w) = row["video"]
            ids += [START] + [VIDEO] * (len(shots) * h * w // 4) + [END]
            videos.append(_clip(shots, (h, w), seed=seed + i, noise=row.get("noise", 0.0)))
            grids_v.append((len(shots), h, w))
        prompts.append(ids + list(row.get("after", [7, 8])))
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt) :] = torch.tensor(prompt)
        mask[r, width - len(prompt) :] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    inputs["mm_token_type_ids"] = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    if images:
        inputs.update(pixel_values=torch.cat(images), image_grid_thw=torch.tensor(grids_i))
    if videos:
        inputs.update(pixel_values_videos=torch.cat(videos), video_grid_thw=torch.tensor(grids_v))
    return inputs


def _generate(model, inputs: dict, **kwargs):
    return model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True, **kwargs)


# -- the pure pieces ------------------------------------------------------------------------------


def _frames(shots: list[int], S: int = 12, D: int = 16, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pictures = {s: torch.randn(S, D, generator=g) for s in sorted(set(shots))}
    return torch.stack([pictures[s] + noise * torch.randn(S, D, generator=g) for s in shots])


def test_cuts_are_found_where_the_shot_changes():
    frames = _frames([0, 0, 0, 1, 1, 2, 2, 2])
    assert find_cuts(centred_units(frames)).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert find_cuts(centred_units(_frames([3] * 5))).tolist() == [0] * 5


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.9])
def test_merged_tokens_are_exact_means_and_never_cross_a_cut(ratio):
    frames = _frames([0, 0, 0, 1, 1, 1, 1, 2])  # two cuts
    T, S, D = frames.shape
    video = frames.reshape(T * S, D)
    keep = kept_video_tokens(T * S, ratio)
    out = merge_video(video, T, keep)
    assert out.features.shape == (keep, D)
    assert sorted(set(out.source.tolist())) == list(range(keep))
    torch.testing.assert_close(out.sizes, torch.bincount(out.source, minlength=keep).float())
    for j in range(keep):
        members = out.source == j
        torch.testing.assert_close(out.features[j], video[members].mean(0))
        assert len(set(out.segment_of_token[members].tolist())) == 1  # one segment each
    assert out.segments.tolist() == [0, 0, 0, 1, 1, 1, 1, 2]


def test_a_still_shot_merges_across_time_first():
    frames = _frames([0] * 6, noise=0.01)
    T, S, D = frames.shape
    out = merge_video(frames.reshape(T * S, D), T, keep=S)
    # each place became one token holding its 6 groups: the temporal runs, no spatial merge
    assert torch.equal(out.source.reshape(T, S), torch.arange(S).expand(T, S))
    assert out.sizes.tolist() == [6.0] * S


def test_the_temporal_budget_keeps_the_strongest_links():
    frames = _frames([0] * 4, noise=0.01)
    links = temporal_runs(centred_units(frames), torch.zeros(4, dtype=torch.long), max_links=5)
    assert int(links.sum()) == 5 and not links[0].any()


def test_one_group_and_nothing_to_merge():
    frames = _frames([0])
    video = frames.reshape(12, 16)
    out = merge_video(video, 1, keep=4)  # a video of one temporal group: spatial only
    assert out.features.shape == (4, 16) and out.segments.tolist() == [0]
    same = merge_video(video, 1, keep=12)
    assert torch.equal(same.features, video) and torch.equal(same.source, torch.arange(12))
    assert kept_video_tokens(12, 0.0) == 12 and kept_video_tokens(12, None) == 12
    with pytest.raises(ValueError, match="do not split into 5 frame groups"):
        merge_video(video, 5, keep=4)


def test_a_video_keeps_one_token_per_segment_at_least():
    frames = _frames([0, 1, 2, 3])  # a cut at every group
    out = merge_video(frames.reshape(48, 16), 4, keep=1)
    assert out.features.shape[0] == 4
    assert [set(out.segment_of_token[out.source == j].tolist()) for j in range(4)] == [{0}, {1}, {2}, {3}]


def test_a_video_s_merge_does_not_depend_on_other_videos():
    a = merge_video(_frames([0, 0, 1], seed=1).reshape(36, 16), 3, 9)
    b = merge_video(_frames([0, 0, 1], seed=1).reshape(36, 16), 3, 9)
    assert torch.equal(a.features, b.features) and torch.equal(a.source, b.source)


@pytest.mark.parametrize("quota", ["runs", "equal"])
@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.9, 0.97])
def test_a_per_group_quota_keeps_each_group_s_share_exact_and_within_its_segment(quota, ratio):
    frames = _frames([0, 0, 0, 1, 1, 1, 1, 2])  # a still start, two cuts
    T, S, D = frames.shape
    video = frames.reshape(T * S, D)
    keep = kept_video_tokens(T * S, ratio)
    out = merge_video(video, T, keep, spatial_quota=quota)
    k = out.features.shape[0]
    assert sorted(set(out.source.tolist())) == list(range(k))
    for j in range(k):
        members = out.source == j
        torch.testing.assert_close(out.features[j], video[members].mean(0))
        assert len(set(out.segment_of_token[members].tolist())) == 1
    # each group kept its quota of the runs starting in it (in group order), one at least
    plain = merge_video(video, T, kept_video_tokens(T * S, 0.0) - 1, spatial_quota=quota)
    assert plain.features.shape[0] == T * S - 1
    counts = group_counts(out.source, T)
    heads = merge_video(video, T, keep, spatial_quota=quota, link_similarity=2.0)  # no runs
    assert group_counts(heads.source, T) == group_quotas(torch.full((T,), S), keep, quota).tolist()
    assert k == max(keep, sum(c > 0 for c in counts)) and all(c >= 0 for c in counts)


def test_group_quotas_share_the_budget():
    runs = torch.tensor([64, 3, 0, 20, 1])
    for quota in ("runs", "equal"):
        for keep in (1, 4, 10, 50, 88):
            q = group_quotas(runs, keep, quota)
            assert int(q.sum()) == max(keep, 4) and (q <= runs).all() and (q[runs > 0] >= 1).all()
            assert q[2] == 0
    assert group_quotas(runs, 44, "runs").tolist() == [32, 1, 0, 10, 1]
    with pytest.raises(ValueError, match="spatial_quota"):
        group_quotas(runs, 4, "most")


def test_min_run_undoes_short_runs_only():
    frames = _frames([0] * 6, noise=0.01)
    frames[2:4, 0] = 3 * torch.randn(
        2, 16, generator=torch.Generator().manual_seed(5)
    )  # place 0 changes at groups 2 and 3: runs of 2, 1, 1, 2
    units = centred_units(frames)
    segments = torch.zeros(6, dtype=torch.long)
    every = temporal_runs(units, segments, 100)
    long = temporal_runs(units, segments, 100, min_run=3)
    assert every[1:, 1:].all() and long[1:, 1:].all()  # the still places: one run of 6 each
    assert every[1, 0] and every[5, 0] and not long[:, 0].any()  # place 0: runs of 2 undone
    out = merge_video(frames.reshape(6 * 12, 16), 6, keep=11 + 6, min_run=3)
    assert out.sizes.sum() == 72 and out.features.shape[0] == 17
    cut = torch.cat([frames[:4], _frames([1] * 2, noise=0.01, seed=3)])  # segments of 4 and 2 groups
    whole = temporal_runs(centred_units(cut), find_cuts(centred_units(cut)), 100, min_run="segment")
    assert whole[1:4, 1:].all() and whole[5].all() and not whole[:4, 0].any() and not whole[4].any()


def test_bad_merge_options_are_clear_errors():
    video = _frames([0, 0]).reshape(24, 16)
    with pytest.raises(ValueError, match="spatial_quota: expected"):
        merge_video(video, 2, 4, spatial_quota="frame")
    with pytest.raises(ValueError, match="needs spatial_within='group'"):
        merge_video(video, 2, 4, spatial_quota="runs", spatial_within="segment")
    with pytest.raises(ValueError, match="spatial_within: expected"):
        merge_video(video, 2, 4, spatial_within="clip")
    for bad in (0, 2.5, True, "3"):
        with pytest.raises(ValueError, match="min_run: expected a whole number"):
            merge_video(video, 2, 4, min_run=bad)


# -- the model -------------------------------------------------------------------------------------

STILL_THEN_CUT = {"text": [1, 5, 6], "video": ([0, 0, 0, 1, 1], (8, 8)), "noise": 0.02}


@torch.no_grad()
@pytest.mark.parametrize("version", ["2.5", "2"])
@pytest.mark.parametrize("settings", [{"video_ratio": 0.0}, {"video_ratio": None}])
def test_no_video_merging_is_exact(version, settings):
    model = tiny_qwen(version)
    inputs = _video_batch([STILL_THEN_CUT])
    logits = model(**inputs).logits
    reference = _generate(model, inputs)
    tome.patch(model, **settings)
    assert torch.equal(model(**inputs).logits, logits)
    out = _generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))


@torch.no_grad()
@pytest.mark.parametrize("version", ["2.5", "2"])
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_the_prefill_and_the_cache_shrink_by_the_merged_video_tokens(version, ratio):
    model = tome.patch(tiny_qwen(version), video_ratio=ratio)
    inputs = _video_batch([STILL_THEN_CUT])
    n = 5 * 16
    removed = n - kept_video_tokens(n, ratio)
    width = inputs["input_ids"].shape[1]
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert calls[0]["length"] == width - removed
    assert [c["length"] for c in calls[1:]] == [1] * (GREEDY["max_new_tokens"] - 1)
    out = _generate(model, inputs)
    assert out.cache.get_seq_length() == width - removed + GREEDY["max_new_tokens"] - 1
    assert torch.equal(out.sequences[:, :width], inputs["input_ids"])
    # a direct forward (a video, no image) reads the shortened prompt too
    assert model(**inputs).logits.shape[1] == width - removed


@torch.no_grad()
@pytest.mark.parametrize("version", ["2.5", "2"])
def test_no_merge_crosses_a_planted_cut_and_positions_are_the_means(version):
    model = tiny_qwen(version)
    inputs = _video_batch([STILL_THEN_CUT])
    ids = inputs["input_ids"]
    full, _ = model.model.get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"]
    )
    features = model.get_video_features(
        pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"]
    ).pooler_output[0]
    keep = kept_video_tokens(80, 0.9)
    out = merge_video(features, 5, keep)
    assert out.segments.tolist() == [0, 0, 0, 1, 1]  # the planted cut is found
    for j in range(keep):
        assert len(set(out.segment_of_token[out.source == j].tolist())) == 1
    assert out.sizes.max() > 3  # still regions merged across groups
    tome.patch(model, video_ratio=0.9)
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    short = calls[0]["position_ids"][1:, 0]  # (3, L'): (t, h, w)
    video = full[:, 0, ids[0] == VIDEO].double()
    expected = torch.stack([video[:, out.source == j].mean(1).round() for j in range(keep)], 1).long()
    first = 3 + 1  # text, then the vision start
    assert torch.equal(short[:, first : first + keep], expected)
    assert torch.equal(short[:, :first], full[:, 0, :first])
    assert torch.equal(short[:, first + keep :], full[:, 0, first + 80 :])  # text after keeps its own


@torch.no_grad()
@pytest.mark.parametrize("version", ["2.5", "2"])
def test_each_row_is_its_own_run_with_a_video_and_an_image_in_different_rows(version):
    model = tome.patch(tiny_qwen(version), visual_tokens=5, video_ratio=0.8)
    rows = [
        {"text": [1, 5], "image": (8, 12), "after": [7]},
        STILL_THEN_CUT,
        {"text": [1, 11, 12], "video": ([0, 1, 1], (8, 8)), "image": (8, 8), "noise": 0.05, "after": [9]},
    ]
    together = _generate(model, _video_batch(rows, seed=3))
    width = _video_batch(rows, seed=3)["input_ids"].shape[1]
    for r, row in enumerate(rows):
        alone_inputs = _video_batch([row], seed=3)
        # the same pixels as in the batch: take them from the batch
        batch = _video_batch(rows, seed=3)
        alone_inputs = _slice_row(batch, rows, r, alone_inputs)
        alone = _generate(model, alone_inputs)
        new = together.sequences[r, width:]
        own = alone.sequences[0, alone_inputs["input_ids"].shape[1] :]
        assert torch.equal(new[: len(own)], own)
        torch.testing.assert_close(together.logits[0][r], alone.logits[0][0], rtol=1e-4, atol=1e-4)


def _slice_row(batch: dict, rows: list[dict], r: int, alone: dict) -> dict:
    """``alone`` (row ``r`` built alone) with the pixels row ``r`` has in ``batch``."""
    image_start = sum(h * w for row in rows[:r] if row.get("image") for h, w in [row["image"]])
    video_start = sum(len(s) * h * w for row in rows[:r] if row.get("video") for s, (h, w) in [row["video"]])
    row = rows[r]
    if row.get("image"):
        h, w = row["image"]
        alone["pixel_values"] = batch["pixel_values"][image_start : image_start + h * w]
    if row.get("video"):
        shots, (h, w) = row["video"]
        n = len(shots) * h * w
        alone["pixel_values_videos"] = batch["pixel_values_videos"][video_start : video_start + n]
    return alone


@torch.no_grad()
def test_a_video_of_one_temporal_group_merges_spatially():
    model = tome.patch(tiny_qwen(), video_ratio=0.75)
    inputs = _video_batch([{"text": [1, 5], "video": ([0], (8, 8))}])
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert calls[0]["length"] == inputs["input_ids"].shape[1] - (16 - 4)


@torch.no_grad()
def test_video_tokens_sizes_reach_every_layer():
    model = tiny_qwen()
    inputs = _video_batch([STILL_THEN_CUT])
    tome.patch(model, video_ratio=0.9)
    seen: dict[int, list] = {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.setdefault(i, []).append(kw["attention_mask"]), with_kwargs=True
        )
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        _generate(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    features = model.get_video_features(
        pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"]
    ).pooler_output[0]
    out = merge_video(features, 5, kept_video_tokens(80, 0.9))
    first, keep = 4, out.features.shape[0]
    for masks in seen.values():
        assert len(masks) == GREEDY["max_new_tokens"]
        for mask in masks:  # the prefill and every decode step: log(size) on the video's keys
            last = mask[0, 0, -1]
            torch.testing.assert_close(last[first : first + keep], out.sizes.log())
            assert torch.equal(last[:first], torch.zeros(first))


@torch.no_grad()
def test_video_unpatch_copies_and_pickles():
    model = tiny_qwen()
    inputs = _video_batch([STILL_THEN_CUT, {"text": [1, 5], "image": (8, 8)}])
    check_copies_and_unpatch(model, lambda m: _generate(m, inputs), video_ratio=0.9)


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, "0.9", True])
def test_bad_video_ratio_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"video_ratio: expected a number in \[0, 1\)"):
        tome.patch(tiny_qwen(), video_ratio=value)
    model = tome.patch(tiny_qwen(), video_ratio=0.5)
    with pytest.raises(ValueError, match=r"video_ratio: expected a number in \[0, 1\)"):
        model.tome.video_ratio = value
    assert model.tome.video_ratio == 0.5


def test_video_ratio_is_refused_by_families_without_videos():
    from _vlm import tiny_llava

    with pytest.raises(TypeError, match="video_ratio: an option of"):
        tome.patch(tiny_llava(), video_ratio=0.9)
