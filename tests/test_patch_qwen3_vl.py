"""Vision-language models (reduce once, before the decoder): transformers Qwen3-VL on tiny random
configs. DeepStack features merged with the main features' groups, the M-RoPE positions, generate(),
the prefill and KV-cache lengths, padded batches with images of different sizes, unpatch.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tome
from tome.adapters.common.vlm import reduce_images_tracked

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
    pytest.skip("no Qwen3-VL in this transformers", allow_module_level=True)

from _vlm import END, IMAGE, PAD, START, VIDEO, check_copies_and_unpatch, language_model_calls  # noqa: E402
from _vlm_internvl_qwen3 import (  # noqa: E402
    PATCH,
    attention_masks,
    check_log_sizes,
    kept_prompt,
    qwen3_batch,
    qwen3_prompt,
    tiny_qwen3,
)

from tome.adapters.transformers_qwen3_vl import merge_like  # noqa: E402

A = ([1, 5, 6], [(1, 8, 12)], [7, 8, 9])  # one image of 24 tokens
B = ([1, 11], [(1, 8, 8), (1, 12, 8)], [12, 13])  # two images: 16 and 24 tokens
C = ([1, 5], [(1, 4, 8)], [7])  # one image of 8 tokens
GREEDY = {"max_new_tokens": 5, "do_sample": False}


def _generate(model, inputs: dict, **kwargs):
    return model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True, **kwargs)


def _language_model_inputs(model, run) -> list[dict]:
    """Every keyword argument the language model gets, call by call (the first: the prefill)."""
    seen: list[dict] = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True
    )
    try:
        run()
    finally:
        hook.remove()
    return seen


# -- DeepStack ------------------------------------------------------------------------------------


def test_merge_like_is_the_mean_of_each_group_and_the_identity_when_nothing_merged():
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(24, 8, generator=g), torch.randn(16, 8, generator=g)]
    merged, sources = reduce_images_tracked(images, 5, None)
    after = [m.shape[0] for m in merged]
    # applied to the very features that were merged, it gives the merge back
    for a, b in zip(merge_like(images, sources, after), merged, strict=True):
        torch.testing.assert_close(a, b)
    other = [torch.randn(24, 3, generator=g), torch.randn(16, 3, generator=g)]
    for level, source, out in zip(other, sources, merge_like(other, sources, after), strict=True):
        for j in range(5):
            torch.testing.assert_close(out[j], level[source == j].mean(0))
    identity = [torch.arange(24), torch.arange(16)]
    assert all(a is b for a, b in zip(merge_like(other, identity, [24, 16]), other, strict=True))
    half = other[0].half()
    assert merge_like([half], sources[:1], after[:1])[0].dtype == torch.float16


@torch.no_grad()
def test_deepstack_features_are_merged_with_the_main_features_groups():
    """What the language model reads at the merged visual positions: main features and every
    DeepStack level are the means of the same original tokens (the groups the main features'
    matching made), at the same positions (``visual_pos_masks``: the kept placeholders)."""
    model = tiny_qwen3()
    rows = [C, B]
    inputs = qwen3_batch(rows)
    image = model.get_image_features(
        pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], return_dict=True
    )
    main, levels = list(image.pooler_output), [list(level) for level in image.deepstack_features]
    assert len(levels) == 2 and all(
        f.shape == m.shape for level in levels for f, m in zip(level, main, strict=True)
    )
    merged, sources = reduce_images_tracked(main, 5, None)
    # each level differs from the main features (else the test would not tell groups apart)
    assert all(not torch.allclose(level[0], main[0]) for level in levels)
    tome.patch(model, visual_tokens=5)
    prefill = _language_model_inputs(model, lambda: _generate(model, inputs))[0]
    width = prefill["inputs_embeds"].shape[1]
    short = torch.tensor([kept_prompt(qwen3_prompt(*r), [5] * len(r[1]), width) for r in rows])
    positions = prefill["visual_pos_masks"]
    assert torch.equal(positions, short == IMAGE)
    written = prefill["inputs_embeds"][positions]  # (15, D): 3 images x 5 tokens, in batch order
    torch.testing.assert_close(written, torch.cat(merged))
    deepstack = prefill["deepstack_visual_embeds"]
    assert len(deepstack) == 2
    for level, injected in zip(levels, deepstack, strict=True):
        assert injected.shape == written.shape
        expected = torch.cat(
            [torch.stack([f[s == j].mean(0) for j in range(5)]) for f, s in zip(level, sources, strict=True)]
        )
        torch.testing.assert_close(injected, expected)
        # and not what each level's own matching would have made of it
        own = torch.cat(reduce_images_tracked(level, 5, None)[0])
        assert not torch.allclose(injected, own)


@torch.no_grad()
def test_no_deepstack_levels_still_merges():
    model = tiny_qwen3(deepstack=())
    assert model.model.visual.deepstack_visual_indexes == []
    inputs = qwen3_batch([A])
    tome.patch(model, visual_tokens=4)
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert calls[0]["length"] == inputs["input_ids"].shape[1] - 20


# -- the model -------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("settings", [{"visual_ratio": 0.0}, {"visual_tokens": 24}, {"visual_tokens": 1000}])
def test_no_merging_is_exact(settings):
    model = tiny_qwen3()
    inputs = qwen3_batch([A, B])
    logits = model(**inputs).logits
    reference = _generate(model, inputs)
    tome.patch(model, **settings)
    assert torch.equal(model(**inputs).logits, logits)
    out = _generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))


@torch.no_grad()
@pytest.mark.parametrize(
    ("settings", "kept"), [({"visual_tokens": 6}, [6, 6, 6]), ({"visual_ratio": 0.75}, [6, 4, 6])]
)
def test_the_prefill_and_the_cache_shrink_by_the_merged_tokens(settings, kept):
    model = tome.patch(tiny_qwen3(), **settings)
    inputs = qwen3_batch([A, B])
    width = inputs["input_ids"].shape[1]
    lengths = [len(qwen3_prompt(*A)) - (24 - kept[0]), width - (16 - kept[1] + 24 - kept[2])]
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert calls[0]["length"] == max(lengths)
    assert [c["length"] for c in calls[1:]] == [1] * (GREEDY["max_new_tokens"] - 1)  # decode unchanged
    out = _generate(model, inputs)
    assert out.cache.get_seq_length() == calls[0]["length"] + GREEDY["max_new_tokens"] - 1
    assert torch.equal(out.sequences[:, :width], inputs["input_ids"])  # the prompts as given
    assert out.sequences.shape == (2, width + GREEDY["max_new_tokens"])
    forward = language_model_calls(model, lambda: model(**inputs))  # a direct forward: shortened too
    assert [c["length"] for c in forward] == [calls[0]["length"]]
    assert model(**inputs).logits.shape[1] == calls[0]["length"]


@torch.no_grad()
def test_positions_text_keeps_its_own_and_decoding_continues_the_original_prompt():
    model = tiny_qwen3()
    inputs = qwen3_batch([A, B])
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    reference = language_model_calls(model, lambda: _generate(model, inputs))
    deltas = model.model.rope_deltas.clone()
    full = reference[0]["position_ids"]  # (4, B, L): generate()'s text row, then (t, h, w)
    features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    _, sources = reduce_images_tracked(list(features), 5, None)
    tome.patch(model, visual_tokens=5)
    prefill = _language_model_inputs(model, lambda: _generate(model, inputs))
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    short = prefill[0]["position_ids"]
    s_ids = torch.tensor([kept_prompt(qwen3_prompt(*r), [5] * len(r[1]), short.shape[-1]) for r in (A, B)])
    s_mask = s_ids != PAD
    image_index = 0
    for row in range(2):
        # text tokens: the (t, h, w) positions they had unmerged
        text, s_text = mask[row] & (ids[row] != IMAGE), s_mask[row] & (s_ids[row] != IMAGE)
        assert torch.equal(short[1:, row, s_text], full[1:, row, text])
        # the text row: the shortened prompt numbered 0, 1, ... (what generate() builds)
        assert short[0, row, s_mask[row]].tolist() == list(range(int(s_mask[row].sum())))
        # merged tokens: the rounded mean of their tokens' positions, image by image
        image = full[1:, row, ids[row] == IMAGE].double()
        merged = short[1:, row, s_ids[row] == IMAGE]
        offset = 0
        for k in range(1 + row):
            source = sources[image_index]
            part = image[:, offset : offset + source.shape[0]]
            expected = torch.stack([part[:, source == j].mean(1).round() for j in range(5)], 1).long()
            assert torch.equal(merged[:, 5 * k : 5 * k + 5], expected)
            offset += source.shape[0]
            image_index += 1
    # decode steps: the same (t, h, w) positions as unmerged (from the original prompt's max + 1)
    for a, b in zip(calls[1:], reference[1:], strict=True):
        assert torch.equal(a["position_ids"][1:], b["position_ids"][1:])
    # the model's rope_deltas (a continuation without position_ids) shifted by the removed tokens
    assert (model.model.rope_deltas - deltas)[:, 0].tolist() == [24 - 5, 16 - 5 + 24 - 5]


@torch.no_grad()
@pytest.mark.parametrize("settings", [{"visual_tokens": 5}, {"visual_ratio": 0.5}])
def test_each_row_of_a_padded_batch_is_its_own_run(settings):
    model = tome.patch(tiny_qwen3(), **settings)
    rows = [C, B, A]
    inputs = qwen3_batch(rows, seed=3)
    together = _generate(model, inputs)
    first = 0
    for row, prompt in enumerate(rows):
        alone_inputs = qwen3_batch([prompt])
        patches = sum(t * h * w for t, h, w in prompt[1])
        alone_inputs["pixel_values"] = inputs["pixel_values"][first : first + patches]
        first += patches
        alone = _generate(model, alone_inputs)
        new = together.sequences[row, inputs["input_ids"].shape[1] :]
        own = alone.sequences[0, alone_inputs["input_ids"].shape[1] :]
        assert torch.equal(new[: len(own)], own)
        assert (new[len(own) :] == PAD).all()  # it stopped (eos) before the batch did
        torch.testing.assert_close(together.logits[0][row], alone.logits[0][0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_without_mm_token_type_ids_generate_merges_and_a_forward_keeps_the_model_s_error():
    model = tiny_qwen3()
    inputs = qwen3_batch([A, B], types=False)
    reference = _generate(model, inputs)
    tome.patch(model, visual_tokens=1000)
    assert torch.equal(_generate(model, inputs).sequences, reference.sequences)
    model.tome.visual_tokens = 4
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert calls[0]["length"] == inputs["input_ids"].shape[1] - (16 - 4 + 24 - 4)
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**inputs)


@torch.no_grad()
def test_beam_search_sampling_without_cache_and_positional_prompts():
    model = tome.patch(tiny_qwen3(), visual_ratio=0.5)
    inputs = qwen3_batch([A, B])
    width = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, width + 3)
    assert torch.equal(beams[:, :width], inputs["input_ids"].repeat_interleave(2, dim=0))
    first = 0
    for row, prompt in enumerate([A, B]):  # each row's beams read that row's images, DeepStack included
        alone = qwen3_batch([prompt])
        patches = sum(t * h * w for t, h, w in prompt[1])
        alone["pixel_values"] = inputs["pixel_values"][first : first + patches]
        first += patches
        solo = model.generate(**alone, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
        assert torch.equal(beams[2 * row : 2 * row + 2, width:], solo[:, alone["input_ids"].shape[1] :])
    assert model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5).shape == (2, width + 3)
    assert model.generate(**inputs, max_length=width + 2, do_sample=False).shape == (2, width + 2)
    cached = model.generate(**inputs, **GREEDY)
    assert torch.equal(model.generate(**inputs, **GREEDY, use_cache=False), cached)
    ids = inputs.pop("input_ids")
    assert torch.equal(model.generate(ids, **inputs, **GREEDY), cached)


def test_labels_are_shortened_with_the_prompt():
    model = tome.patch(tiny_qwen3(), visual_tokens=4)
    inputs = qwen3_batch([A, B])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == IMAGE, -100)
    out = model(**inputs, labels=labels)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - (16 - 4 + 24 - 4)
    assert torch.isfinite(out.loss)
    out.loss.backward()  # the merge carries gradients to the vision tower, DeepStack mergers included
    assert model.model.visual.merger.linear_fc1.weight.grad is not None
    assert all(m.linear_fc1.weight.grad is not None for m in model.model.visual.deepstack_merger_list)


@torch.no_grad()
def test_text_only_prompts_and_mismatched_images():
    model = tiny_qwen3()
    text = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    reference = model.generate(**text, **GREEDY)
    tome.patch(model, visual_tokens=4)
    assert torch.equal(model.generate(**text, **GREEDY), reference)
    inputs = qwen3_batch([A])
    inputs["input_ids"][0, 5] = 50  # one placeholder fewer than the image's tokens
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model.generate(**inputs, **GREEDY)


@torch.no_grad()
def test_unpatch_copies_and_pickles():
    model = tiny_qwen3()
    inputs = qwen3_batch([A, B])
    check_copies_and_unpatch(model, lambda m: _generate(m, inputs), visual_tokens=4)


def test_the_options_and_bad_ones():
    model = tome.patch(tiny_qwen3(), visual_tokens=64)
    assert type(model.tome).__name__ == "VideoVisualHandle"
    assert model.tome.patch_options() == {
        "visual_tokens": 64, "visual_ratio": None, "visual_prop_attn": True, "video_ratio": 0.75,
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"visual_ratio: expected a number in \[0, 1\)"):
        tome.patch(model, visual_ratio=1.0)
    with pytest.raises(TypeError, match=r"prop_attn: not an option for vision-language models"):
        tome.patch(tiny_qwen3(), prop_attn=False)
    assert model.tome.visual_tokens == 64


@torch.no_grad()
def test_video_ratio_none_leaves_a_prompt_s_video_as_it_was():
    model = tiny_qwen3()
    inputs = qwen3_batch([A])
    video = [START] + [VIDEO] * 16 + [END]  # 1 x 8 x 8 patches -> 16 tokens
    ids = torch.cat([inputs["input_ids"][:, :3], torch.tensor([video]), inputs["input_ids"][:, 3:]], dim=1)
    g = torch.Generator().manual_seed(5)
    inputs.update(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == IMAGE).int() + 2 * (ids == VIDEO).int(),
        pixel_values_videos=torch.randn(64, PATCH, generator=g),
        video_grid_thw=torch.tensor([[1, 8, 8]]),
    )
    reference = _generate(model, inputs)
    tome.patch(model, visual_tokens=4, video_ratio=None)  # the image merges, the video does not
    seen = _language_model_inputs(model, lambda: _generate(model, inputs))
    assert seen[0]["inputs_embeds"].shape[1] == ids.shape[1] - (24 - 4)
    model.tome.visual_tokens = None  # nothing merges at all: the model's own run
    out = _generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))


# -- proportional attention in the language model ---------------------------------------------------


@torch.no_grad()
def test_every_layer_sees_log_sizes_in_the_prefill_and_every_decode_step():
    model = tiny_qwen3()
    rows = [C, B]
    inputs = qwen3_batch(rows)
    image = model.get_image_features(
        pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], return_dict=True
    )
    merged, sources = reduce_images_tracked(list(image.pooler_output), 5, None)
    sizes = torch.cat([torch.bincount(s, minlength=m.shape[0]) for s, m in zip(sources, merged, strict=True)])
    assert sizes.max() > 1
    tome.patch(model, visual_tokens=5)
    calls = []
    seen = attention_masks(
        model, lambda: calls.extend(language_model_calls(model, lambda: _generate(model, inputs)))
    )
    short = torch.tensor([kept_prompt(qwen3_prompt(*r), [5] * len(r[1]), calls[0]["length"]) for r in rows])
    assert len(seen) == len(model.model.language_model.layers)
    check_log_sizes(seen, short, sizes.float().log(), GREEDY["max_new_tokens"])


@torch.no_grad()
def test_prop_attn_off_leaves_the_attention_alone():
    model = tome.patch(tiny_qwen3(), visual_tokens=5, visual_prop_attn=False)
    inputs = qwen3_batch([C, B])
    out = _generate(model, inputs)
    twin = copy.deepcopy(model)
    for layer in twin.model.language_model.layers:
        layer.self_attn._forward_pre_hooks.clear()  # tome's proportional attention hooks
    plain = _generate(twin, inputs)
    assert torch.equal(out.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, plain.logits, strict=True))
    model.tome.visual_prop_attn = True
    assert not torch.allclose(_generate(model, inputs).logits[0], plain.logits[0], atol=1e-6)
