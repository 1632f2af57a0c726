"""Vision-language models (reduce once, before the decoder): transformers Qwen2.5-VL and Qwen2-VL
on tiny random configs. generate(), the prefill and KV-cache lengths, the M-RoPE positions,
padded batches with images of different sizes, the options' errors.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tome
from tome.adapters.common.vlm import merged_positions, reduce_images, reduce_images_tracked

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

PATCH = 3 * 2 * 4 * 4  # a flattened patch: channels x temporal_patch_size x patch_size ** 2


def _tokens(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // 4  # the 2x2 patch merger


def _prompt(before: list[int], grids: list[tuple[int, int, int]], after: list[int]) -> list[int]:
    ids = list(before)
    for grid in grids:
        ids += [START] + [IMAGE] * _tokens(grid) + [END]
    return ids + after


def _batch(
    rows: list[tuple[list[int], list[tuple[int, int, int]], list[int]]], seed: int = 1, types: bool = True
) -> dict:
    """The processor's inputs: the prompts left-padded to the longest, their images' patches."""
    prompts = [_prompt(*row) for row in rows]
    grids = [grid for row in rows for grid in row[1]]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    patches = sum(t * h * w for t, h, w in grids)
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(patches, PATCH, generator=g),
        "image_grid_thw": torch.tensor(grids),
    }
    if types:
        inputs["mm_token_type_ids"] = (ids == IMAGE).int()
    return inputs


A = ([1, 5, 6], [(1, 8, 12)], [7, 8, 9])  # one image of 24 tokens
B = ([1, 11], [(1, 8, 8), (1, 12, 8)], [12, 13])  # two images: 16 and 24 tokens
C = ([1, 5], [(1, 4, 8)], [7])  # one image of 8 tokens
GREEDY = {"max_new_tokens": 5, "do_sample": False}


def _generate(model, inputs: dict, **kwargs):
    return model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True, **kwargs)


# -- the pure pieces ------------------------------------------------------------------------------


def test_reduce_images_tracked_matches_reduce_images():
    g = torch.Generator().manual_seed(0)
    images = [
        torch.randn(24, 8, generator=g),
        torch.randn(16, 8, generator=g),
        torch.randn(24, 8, generator=g),
    ]
    merged, sources = reduce_images_tracked(images, None, 0.75)
    for a, b in zip(merged, reduce_images(images, None, 0.75), strict=True):
        assert torch.equal(a, b)
    for image, out, source in zip(images, merged, sources, strict=True):
        assert source.shape == (image.shape[0],)
        assert sorted(set(source.tolist())) == list(range(out.shape[0]))
        # each merged token is the mean of the tokens its source map gives it
        for j in range(out.shape[0]):
            torch.testing.assert_close(out[j], image[source == j].mean(0))
    merged, sources = reduce_images_tracked(images, 1000, None)
    assert all(torch.equal(s, torch.arange(i.shape[0])) for s, i in zip(sources, images, strict=True))


def test_merged_positions_are_the_rounded_means_and_text_keeps_its_own():
    ids = torch.tensor([[0, 5, 9, 9, 9, 9, 6, 9, 9, 7], [5, 9, 9, 9, 6, 7, 7, 7, 7, 7]])
    positions = torch.stack([torch.arange(10).expand(2, 10) * k for k in (1, 2, 3)])
    sources = [torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0]), torch.tensor([1, 0, 0])]
    out = merged_positions(positions, ids, 9, sources, [2, 1, 2])
    # row 0, image 0 (columns 2-5): tokens {2, 3} -> 2.5 -> 2 (half to even), {4, 5} -> 4.5 -> 4
    assert out[0, 0].tolist() == [0, 1, 2, 4, 4, 5, 6, 8, 8, 9]
    assert out[2, 0, 2:4].tolist() == [8, 14]  # (6 + 9) / 2 = 7.5 -> 8, (12 + 15) / 2 = 13.5 -> 14
    # image 1 (columns 7-8): one token at 7.5 -> 8; row 1, image 2: token 0 holds {2, 3}, token 1 {1}
    assert out[1, 1].tolist() == [0, 5, 2, 6, 8, 10, 12, 14, 16, 18]


# -- the model -------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("version", ["2.5", "2"])
@pytest.mark.parametrize("settings", [{"visual_ratio": 0.0}, {"visual_tokens": 24}, {"visual_tokens": 1000}])
def test_no_merging_is_exact(version, settings):
    model = tiny_qwen(version)
    inputs = _batch([A, B])
    logits = model(**inputs).logits
    reference = _generate(model, inputs)
    tome.patch(model, **settings)
    assert torch.equal(model(**inputs).logits, logits)
    out = _generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))


@torch.no_grad()
@pytest.mark.parametrize("version", ["2.5", "2"])
@pytest.mark.parametrize(
    ("settings", "kept"), [({"visual_tokens": 6}, [6, 6, 6]), ({"visual_ratio": 0.75}, [6, 4, 6])]
)
def test_the_prefill_and_the_cache_shrink_by_the_merged_tokens(version, settings, kept):
    model = tome.patch(tiny_qwen(version), **settings)
    inputs = _batch([A, B])
    width = inputs["input_ids"].shape[1]  # the row with two images: 2 + 2 * 2 + 16 + 24 + 2 = 48
    lengths = [len(_prompt(*A)) - (24 - kept[0]), width - (16 - kept[1] + 24 - kept[2])]
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert calls[0]["length"] == max(lengths)
    assert [c["length"] for c in calls[1:]] == [1] * (GREEDY["max_new_tokens"] - 1)  # decode unchanged
    out = _generate(model, inputs)
    assert out.cache.get_seq_length() == calls[0]["length"] + GREEDY["max_new_tokens"] - 1
    assert torch.equal(out.sequences[:, :width], inputs["input_ids"])  # the prompts as given
    assert out.sequences.shape == (2, width + GREEDY["max_new_tokens"])
    # a direct forward reads the shortened prompt too
    forward = language_model_calls(model, lambda: model(**inputs))
    assert [c["length"] for c in forward] == [calls[0]["length"]]
    assert model(**inputs).logits.shape[1] == calls[0]["length"]


def _prefill_inputs(model, run) -> dict:
    """The keyword arguments of the model's first forward (generate()'s prefill)."""
    seen: list[dict] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def test_positions_text_keeps_its_own_and_decoding_continues_the_original_prompt():
    model = tiny_qwen()
    inputs = _batch([A, B])
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    reference = language_model_calls(model, lambda: _generate(model, inputs))
    deltas = model.model.rope_deltas.clone()
    full = reference[0]["position_ids"]  # (4, B, L): generate()'s text row, then (t, h, w)
    tome.patch(model, visual_tokens=5)
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    prefill = _prefill_inputs(model, lambda: _generate(model, inputs))
    s_ids, s_mask, short = prefill["input_ids"], prefill["attention_mask"].bool(), prefill["position_ids"]
    assert torch.equal(short, calls[0]["position_ids"])
    for row in range(2):
        # text tokens: the (t, h, w) positions they had unmerged
        text, s_text = mask[row] & (ids[row] != IMAGE), s_mask[row] & (s_ids[row] != IMAGE)
        assert torch.equal(short[1:, row, s_text], full[1:, row, text])
        # the text row: the shortened prompt numbered 0, 1, ... (what generate() builds)
        assert short[0, row, s_mask[row]].tolist() == list(range(int(s_mask[row].sum())))
        # merged tokens: within the span of their image's positions
        image = full[1:, row, ids[row] == IMAGE]
        merged = short[1:, row, s_ids[row] == IMAGE]
        assert merged.shape[1] == 5 * (1 + row)
        assert (merged >= image.amin(1, keepdim=True)).all() and (merged <= image.amax(1, keepdim=True)).all()
    # decode steps: the same (t, h, w) positions as unmerged (from the original prompt's max + 1)
    for a, b in zip(calls[1:], reference[1:], strict=True):
        assert torch.equal(a["position_ids"][1:], b["position_ids"][1:])
    # the model's rope_deltas (a continuation without position_ids) shifted by the removed tokens
    assert (model.model.rope_deltas - deltas)[:, 0].tolist() == [24 - 5, 16 - 5 + 24 - 5]


@torch.no_grad()
def test_merged_positions_are_the_mean_of_their_tokens():
    model = tome.patch(tiny_qwen(), visual_tokens=3)
    inputs = _batch([A])
    ids = inputs["input_ids"]
    full, _ = model.model.get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    _, (source,) = reduce_images_tracked(list(features), 3, None)
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    short = calls[0]["position_ids"][1:, 0]  # (3, L')
    image = full[:, 0, ids[0] == IMAGE].double()
    expected = torch.stack([image[:, source == j].mean(1).round() for j in range(3)], 1).long()
    assert torch.equal(short[:, 4:7], expected)  # after 1, 5, 6 and the vision start
    assert torch.equal(short[:, :4], full[:, 0, :4])
    assert torch.equal(short[:, 7:], full[:, 0, 4 + 24 :])


@torch.no_grad()
@pytest.mark.parametrize("settings", [{"visual_tokens": 5}, {"visual_ratio": 0.5}])
def test_each_row_of_a_padded_batch_is_its_own_run(settings):
    model = tome.patch(tiny_qwen(), **settings)
    together = _generate(model, _batch([C, B, A], seed=3))
    inputs = _batch([C, B, A], seed=3)
    patches = inputs["pixel_values"]
    sizes = [32, 64 + 96, 96]
    starts = [0, 32, 192]
    for row, prompt in enumerate([C, B, A]):
        alone_inputs = _batch([prompt])
        alone_inputs["pixel_values"] = patches[starts[row] : starts[row] + sizes[row]]
        alone = _generate(model, alone_inputs)
        new = together.sequences[row, inputs["input_ids"].shape[1] :]
        own = alone.sequences[0, alone_inputs["input_ids"].shape[1] :]
        assert torch.equal(new[: len(own)], own)
        assert (new[len(own) :] == PAD).all()  # it stopped (eos) before the batch did
        torch.testing.assert_close(together.logits[0][row], alone.logits[0][0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_without_mm_token_type_ids_the_model_s_own_positions():
    model = tiny_qwen()
    inputs = _batch([A, B], types=False)
    reference = _generate(model, inputs)
    tome.patch(model, visual_tokens=1000)
    assert torch.equal(_generate(model, inputs).sequences, reference.sequences)
    model.tome.visual_tokens = 4
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert calls[0]["length"] == inputs["input_ids"].shape[1] - (16 - 4 + 24 - 4)


@torch.no_grad()
def test_beam_search_sampling_without_cache_and_positional_prompts():
    model = tome.patch(tiny_qwen(), visual_tokens=4)
    inputs = _batch([A, B])
    width = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, width + 3)
    assert torch.equal(beams[:, :width], inputs["input_ids"].repeat_interleave(2, dim=0))
    assert model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5).shape == (2, width + 3)
    assert model.generate(**inputs, max_length=width + 2, do_sample=False).shape == (2, width + 2)
    cached = model.generate(**inputs, **GREEDY)
    assert torch.equal(model.generate(**inputs, **GREEDY, use_cache=False), cached)
    ids = inputs.pop("input_ids")
    assert torch.equal(model.generate(ids, **inputs, **GREEDY), cached)


def test_labels_are_shortened_with_the_prompt():
    model = tome.patch(tiny_qwen(), visual_tokens=4)
    inputs = _batch([A, B])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == IMAGE, -100)
    out = model(**inputs, labels=labels)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - (16 - 4 + 24 - 4)
    assert torch.isfinite(out.loss)
    out.loss.backward()  # the merge carries gradients to the vision tower
    assert model.model.visual.merger.mlp[0].weight.grad is not None


@torch.no_grad()
def test_text_only_prompts_and_mismatched_images():
    model = tiny_qwen()
    text = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    reference = model.generate(**text, **GREEDY)
    tome.patch(model, visual_tokens=4)
    assert torch.equal(model.generate(**text, **GREEDY), reference)
    inputs = _batch([A])
    inputs["input_ids"][0, 5] = 50  # one placeholder fewer than the image's tokens
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model.generate(**inputs, **GREEDY)


@torch.no_grad()
def test_unpatch_copies_and_pickles():
    model = tiny_qwen()
    inputs = _batch([A, B])
    check_copies_and_unpatch(model, lambda m: _generate(m, inputs), visual_tokens=4)


def test_the_options():
    model = tome.patch(tiny_qwen(), visual_tokens=64)
    assert type(model.tome).__name__ == "VideoVisualHandle"
    assert model.tome.patch_options() == {
        "visual_tokens": 64, "visual_ratio": None, "visual_prop_attn": True, "video_ratio": 0.75
    }  # fmt: skip
    model.tome.visual_ratio = 0.5
    assert (model.tome.visual_tokens, model.tome.visual_ratio) == (None, 0.5)
    tome.patch(model)
    assert (model.tome.visual_tokens, model.tome.visual_ratio) == (None, 0.75)


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"visual_tokens": 0}, ValueError, r"visual_tokens: expected an int >= 1"),
        ({"visual_ratio": 1.0}, ValueError, r"visual_ratio: expected a number in \[0, 1\)"),
        ({"visual_tokens": 8, "visual_ratio": 0.5}, ValueError, r"visual_tokens and visual_ratio: give one"),
        ({"r": 8}, TypeError, r"r: .*pass visual_tokens= .* or visual_ratio="),
        ({"ratio": 0.5}, TypeError, r"ratio: .*pass visual_tokens= .* or visual_ratio="),
        ({"prop_attn": False}, TypeError, r"prop_attn: not an option for vision-language models"),
        ({"video_ratio": 1.0}, ValueError, r"video_ratio: expected a number in \[0, 1\) .*each video"),
        ({"video_ratio": -0.1}, ValueError, r"video_ratio: expected a number in \[0, 1\)"),
        ({"video_ratio": True}, ValueError, r"video_ratio: expected a number in \[0, 1\)"),
    ],
)
def test_bad_options_are_clear_errors_and_change_nothing(settings, error, match):
    model = tome.patch(tiny_qwen(), visual_tokens=16)
    with pytest.raises(error, match=match):
        tome.patch(model, **settings)
    assert model.tome.visual_tokens == 16  # the earlier patch is back
    with pytest.raises(error, match=match):
        tome.patch(tiny_qwen(), **settings)


@torch.no_grad()
def test_a_prompt_with_a_video_merges_its_video_and_its_image_separately():
    model = tiny_qwen()
    inputs = _batch([A])
    video = [START] + [VIDEO] * 32 + [END]  # 2 x 8 x 8 patches -> 32 tokens
    ids = torch.cat([inputs["input_ids"][:, :3], torch.tensor([video]), inputs["input_ids"][:, 3:]], dim=1)
    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    g = torch.Generator().manual_seed(5)
    inputs.update(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=types,
        pixel_values_videos=torch.randn(128, PATCH, generator=g),
        video_grid_thw=torch.tensor([[2, 8, 8]]),
    )
    reference = _generate(model, inputs)
    tome.patch(model, visual_tokens=4, video_ratio=0)  # videos unmerged, the image merged
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert calls[0]["length"] == ids.shape[1] - (24 - 4)
    tome.patch(model, visual_tokens=1000, video_ratio=None)  # nothing merges: exact
    out = _generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))
    tome.patch(model, visual_tokens=4, video_ratio=0.75)  # both: 32 -> 8 video tokens
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert calls[0]["length"] == ids.shape[1] - (24 - 4) - (32 - 8)
    assert torch.equal(_generate(model, inputs).sequences[:, : ids.shape[1]], ids)


# -- proportional attention in the language model ---------------------------------------------------


def _attention_masks(model, run) -> dict[int, list]:
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


@torch.no_grad()
@pytest.mark.parametrize("version", ["2.5", "2"])
def test_every_layer_sees_log_sizes_in_the_prefill_and_every_decode_step(version):
    model = tiny_qwen(version)
    inputs = _batch([C, B])
    image = model.get_image_features(
        pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], return_dict=True
    )
    merged, sources = reduce_images_tracked(list(image.pooler_output), 5, None)
    sizes = torch.cat([torch.bincount(s, minlength=m.shape[0]) for s, m in zip(sources, merged, strict=True)])
    assert sizes.max() > 1
    tome.patch(model, visual_tokens=5)
    ids_seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: ids_seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        seen = _attention_masks(model, lambda: _generate(model, inputs))
    finally:
        hook.remove()
    P = ids_seen[0]
    # the shortened prompt, by hand: each image keeps its first 5 placeholders
    rows = []
    for prompt in (C, B):
        ids = _prompt(*prompt)
        keep, run = [], 0
        for token in ids:
            run = run + 1 if token == IMAGE else 0
            if token != IMAGE or run <= 5:
                keep.append(token)
        rows.append([PAD] * (P - len(keep)) + keep)
    short = torch.tensor(rows)
    expected = torch.zeros(short.shape)
    expected[short == IMAGE] = sizes.float().log()
    real = short != PAD
    assert len(seen) == len(model.model.language_model.layers)
    for masks in seen.values():
        assert len(masks) == GREEDY["max_new_tokens"]
        for step, got in enumerate(masks):
            Q, K = (P, P) if step == 0 else (1, P + step)
            assert got.shape == (2, 1, Q, K) and got.is_floating_point()
            queries = torch.arange(K - Q, K)[:, None]
            allowed = (torch.arange(K)[None, :] <= queries)[None] & torch.cat(
                [real, torch.ones(2, step, dtype=torch.bool)], 1
            )[:, None, :]
            bias = torch.cat([expected, torch.zeros(2, step)], 1)[:, None, :].expand(2, Q, K)
            assert torch.equal(got[:, 0][allowed], bias[allowed])
            assert bool((got[:, 0][~allowed] < -1e30).all())


@torch.no_grad()
def test_prop_attn_off_leaves_the_attention_alone():
    model = tome.patch(tiny_qwen(), visual_tokens=5, visual_prop_attn=False)
    inputs = _batch([C, B])
    out = _generate(model, inputs)
    twin = copy.deepcopy(model)
    for layer in twin.model.language_model.layers:
        layer.self_attn._forward_pre_hooks.clear()  # tome's proportional attention hooks
    plain = _generate(twin, inputs)
    assert torch.equal(out.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, plain.logits, strict=True))
    model.tome.visual_prop_attn = True
    assert not torch.allclose(_generate(model, inputs).logits[0], plain.logits[0], atol=1e-6)
