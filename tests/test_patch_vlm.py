"""Vision-language models (reduce once, before the decoder): transformers LLaVA on tiny random
configs. What the contract test (tests/test_contract.py) does not cover: generate(), the
prefill and KV-cache lengths, padded batches, several images per prompt, the options' errors.
"""

from __future__ import annotations

import pytest
import torch
from _vlm import IMAGE, PAD, check_copies_and_unpatch, language_model_calls, tiny_llava

import tome
from tome.adapters.common.vlm import (
    kept_tokens,
    reduce_features,
    reduce_images,
    reduce_images_tracked,
    shorten_prompts,
)
from tome.core import merge as M

transformers = pytest.importorskip("transformers")

PATCHES = 64  # (32 px / 4 px) ** 2 visual tokens per image (CLS dropped)


def _prompt(before: list[int], images: int, after: list[int]) -> list[int]:
    return before + [IMAGE] * (PATCHES * images) + after


def _batch(prompts: list[list[int]], images: int, side: str = "left", seed: int = 1) -> dict:
    """The processor's inputs: the prompts padded to the longest, and ``images`` images."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        span = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[row, span] = torch.tensor(prompt)
        mask[row, span] = 1
    pixels = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


ONE = _prompt([1, 5, 6], 1, [7, 8, 9])  # 70 tokens, one image
TWO = _prompt([1, 11], 2, [12, 13])  # 132 tokens, two images
GREEDY = {"max_new_tokens": 6, "do_sample": False}


def _generate(model, inputs: dict, **kwargs):
    return model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True, **kwargs)


def _prefill_lengths(model, run) -> list[int]:
    """The sequence lengths the language model reads, call by call (the first: the prefill)."""
    return [call["length"] for call in language_model_calls(model, run)]


# -- the pure pieces ------------------------------------------------------------------------------


def test_kept_tokens():
    assert kept_tokens(576, 64, None) == 64
    assert kept_tokens(576, None, 0.75) == 144
    assert kept_tokens(576, None, 0.0) == 576
    assert kept_tokens(576, None, 0.999) == 1
    assert kept_tokens(30, 64, None) == 30
    assert kept_tokens(30, None, None) == 30


def test_reduce_features_is_the_mean_of_each_group():
    features = torch.randn(3, 576, 16, dtype=torch.float64)
    merged, history = reduce_features(features, 64)
    assert merged.shape == (3, 64, 16)
    assert history.sizes.sum(1).tolist() == [576.0] * 3
    assert (history.sizes >= 1).all()
    # each merged token is the exact mean of the original tokens it holds, through every step
    torch.testing.assert_close(merged, M.merge_original(history, features))


def test_a_class_token_passed_on_never_merges():
    features = torch.randn(2, 65, 16)
    merged, history = reduce_features(features, 1, protected=1)
    assert merged.shape == (2, 2, 16)  # the class token and one token holding all the others
    assert torch.equal(merged[:, 0], features[:, 0])
    assert history.sizes[:, 0].tolist() == [1.0, 1.0]


def test_each_image_merges_by_itself():
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(64, 8, generator=g) for _ in range(3)] + [torch.randn(20, 8, generator=g)]
    together = reduce_images(images, visual_tokens=None, visual_ratio=0.75)
    alone = [reduce_images([image], visual_tokens=None, visual_ratio=0.75)[0] for image in images]
    assert [t.shape[0] for t in together] == [16, 16, 16, 5]
    for a, b in zip(together, alone, strict=True):
        assert torch.equal(a, b)


def test_shorten_prompts_left_and_right_padding():
    ids = torch.tensor([[0, 0, 5, 9, 9, 9, 9, 6], [7, 9, 9, 9, 9, 9, 9, 8]])
    mask = (ids != 0).long()
    # image 0 (row 0): 4 -> 2 tokens; image 1 (row 1): 6 -> 3
    out = shorten_prompts(ids, mask, 9, [4, 6], [2, 3], {}, pad_id=0)
    assert out.width == 5
    assert out.tensors["input_ids"].tolist() == [[0, 5, 9, 9, 6], [7, 9, 9, 9, 8]]
    assert out.tensors["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    right = torch.tensor([[5, 9, 9, 9, 9, 6, 0, 0], [7, 9, 9, 9, 9, 9, 9, 8]])
    labels = torch.arange(16).view(2, 8)
    out = shorten_prompts(right, (right != 0).long(), 9, [4, 6], [2, 3], {"labels": labels}, pad_id=0)
    assert out.tensors["input_ids"].tolist() == [[5, 9, 9, 6, 0], [7, 9, 9, 9, 8]]
    assert out.tensors["labels"].tolist() == [[0, 1, 2, 5, -100], [8, 9, 10, 11, 15]]
    # no mask, rows of different lengths after the merge: left-padded, with a mask made
    ids = torch.tensor([[5, 9, 9, 9, 9, 6], [7, 8, 8, 8, 8, 8]])
    out = shorten_prompts(ids, None, 9, [4], [1], {}, pad_id=0)
    assert out.tensors["input_ids"].tolist() == [[0, 0, 0, 5, 9, 6], [7, 8, 8, 8, 8, 8]]
    assert out.tensors["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [1] * 6]
    ids = torch.tensor([[0, 0, 5, 9, 9, 9, 9, 6], [7, 9, 9, 9, 9, 9, 9, 8]])
    # placeholders that do not add up to the images: None (the model then raises its own error)
    assert shorten_prompts(ids, mask, 9, [4, 4], [2, 2], {}, pad_id=0) is None


# -- the model -------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize(
    "settings", [{"visual_ratio": 0.0}, {"visual_tokens": PATCHES}, {"visual_tokens": 1000}]
)
def test_no_merging_is_exact(settings):
    model = tiny_llava()
    inputs = _batch([ONE, TWO], images=3)
    logits = model(**inputs).logits
    reference = _generate(model, inputs)
    tome.patch(model, **settings)
    assert torch.equal(model(**inputs).logits, logits)
    out = _generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert torch.equal(out.logits[0], reference.logits[0])


@torch.no_grad()
@pytest.mark.parametrize(
    ("settings", "kept"), [({"visual_tokens": 10}, 10), ({"visual_ratio": 0.75}, 16), ({}, 16)]
)
def test_the_prefill_and_the_cache_shrink_by_the_merged_tokens(settings, kept):
    model = tome.patch(tiny_llava(), **settings)
    inputs = _batch([ONE, TWO], images=3)
    width = inputs["input_ids"].shape[1]  # 132: the row with two images
    lengths = _prefill_lengths(model, lambda: _generate(model, inputs))
    assert lengths[0] == width - 2 * (PATCHES - kept)
    assert lengths[1:] == [1] * (GREEDY["max_new_tokens"] - 1)  # each decode step unchanged
    out = _generate(model, inputs)
    assert out.cache.get_seq_length() == lengths[0] + GREEDY["max_new_tokens"] - 1
    # the sequences start with the prompts exactly as given
    assert torch.equal(out.sequences[:, :width], inputs["input_ids"])
    assert out.sequences.shape == (2, width + GREEDY["max_new_tokens"])
    # a direct forward reads the shortened prompt too
    assert _prefill_lengths(model, lambda: model(**inputs)) == [lengths[0]]


@torch.no_grad()
def test_merging_changes_the_answer_a_little():
    model = tiny_llava()
    inputs = _batch([ONE], images=1)
    reference = model(**inputs).logits[:, -1]
    tome.patch(model, visual_tokens=8)
    merged = model(**inputs).logits[:, -1]
    assert not torch.allclose(merged, reference, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("settings", [{"visual_tokens": 8}, {"visual_ratio": 0.5}])
def test_each_row_of_a_padded_batch_is_its_own_run(settings):
    model = tome.patch(tiny_llava(), **settings)
    short = _prompt([1, 5], 1, [7])
    inputs = _batch([short, TWO, ONE], images=4, seed=3)
    together = _generate(model, inputs)
    pixels = inputs["pixel_values"]
    for row, (prompt, images) in enumerate([(short, pixels[:1]), (TWO, pixels[1:3]), (ONE, pixels[3:])]):
        alone = _generate(model, {**_batch([prompt], 0), "pixel_values": images})
        new = together.sequences[row, inputs["input_ids"].shape[1] :]
        assert torch.equal(new, alone.sequences[0, len(prompt) :])
        torch.testing.assert_close(together.logits[0][row], alone.logits[0][0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_the_full_strategy_keeps_the_class_token():
    model = tiny_llava()
    model.config.vision_feature_select_strategy = "full"  # 65 features per image, class token first
    ids = torch.tensor([[1, 5] + [IMAGE] * (PATCHES + 1) + [7]])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(1, 3, 32, 32),
    }
    reference = model.generate(**inputs, **GREEDY)
    tome.patch(model, visual_tokens=1000)
    assert torch.equal(model.generate(**inputs, **GREEDY), reference)
    model.tome.visual_tokens = 1  # at least the class token and one more stay
    assert _prefill_lengths(model, lambda: model(**inputs)) == [2 + 2 + 1]


@torch.no_grad()
def test_beam_search_sampling_and_positional_prompts():
    model = tome.patch(tiny_llava(), visual_tokens=8)
    inputs = _batch([ONE, TWO], images=3)
    width = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, width + 4)
    assert torch.equal(beams[:, :width], inputs["input_ids"].repeat_interleave(2, dim=0))
    sampled = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
    assert sampled.shape == (2, width + 4)
    assert model.generate(**inputs, max_length=width + 3, do_sample=False).shape == (2, width + 3)
    ids = inputs.pop("input_ids")
    positional = model.generate(ids, **inputs, **GREEDY)
    assert torch.equal(positional, model.generate(input_ids=ids, **inputs, **GREEDY))
    assert torch.equal(model(ids, inputs["pixel_values"], inputs["attention_mask"]).logits, model(input_ids=ids, **inputs).logits)  # fmt: skip


@torch.no_grad()
def test_without_cache():
    model = tome.patch(tiny_llava(), visual_tokens=8)
    inputs = _batch([ONE], images=1)
    cached = model.generate(**inputs, **GREEDY)
    assert torch.equal(model.generate(**inputs, **GREEDY, use_cache=False), cached)


def test_labels_are_shortened_with_the_prompt():
    model = tome.patch(tiny_llava(), visual_tokens=8)
    inputs = _batch([ONE, TWO], images=3)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == IMAGE, -100)
    out = model(**inputs, labels=labels)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - 2 * (PATCHES - 8)
    assert torch.isfinite(out.loss)
    out.loss.backward()  # the merge carries gradients to the projector and the vision tower
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None


@torch.no_grad()
def test_text_only_prompts_and_mismatched_images():
    model = tiny_llava()
    text = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    reference = model.generate(**text, **GREEDY)
    tome.patch(model, visual_tokens=8)
    assert torch.equal(model.generate(**text, **GREEDY), reference)
    inputs = _batch([ONE], images=2)  # two images, one image's placeholders: the model's own error
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model.generate(**inputs, **GREEDY)


@torch.no_grad()
def test_unpatch_copies_and_pickles():
    model = tiny_llava()
    inputs = _batch([ONE, TWO], images=3)
    check_copies_and_unpatch(model, lambda m: _generate(m, inputs), visual_tokens=8)


def test_the_options():
    model = tome.patch(tiny_llava(), visual_tokens=64)
    assert (model.tome.visual_tokens, model.tome.visual_ratio) == (64, None)
    assert model.tome.patch_options() == {
        "visual_tokens": 64, "visual_ratio": None, "visual_prop_attn": True, "visual_dominant": None,
        "vision_r": None,
    }  # fmt: skip
    model.tome.visual_ratio = 0.5  # the latest one set counts
    assert (model.tome.visual_tokens, model.tome.visual_ratio) == (None, 0.5)
    tome.patch(model)
    assert (model.tome.visual_tokens, model.tome.visual_ratio) == (None, 0.75)  # the default
    assert model.tome.r is None and model.tome.ratio is None


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"visual_tokens": 0}, ValueError, r"visual_tokens: expected an int >= 1"),
        ({"visual_tokens": 1.5}, ValueError, r"visual_tokens: expected an int >= 1"),
        ({"visual_tokens": True}, ValueError, r"visual_tokens: expected an int >= 1"),
        ({"visual_ratio": 1.0}, ValueError, r"visual_ratio: expected a number in \[0, 1\)"),
        ({"visual_ratio": -0.1}, ValueError, r"visual_ratio: expected a number in \[0, 1\)"),
        ({"visual_ratio": "0.5"}, ValueError, r"visual_ratio: expected a number in \[0, 1\)"),
        ({"visual_tokens": 8, "visual_ratio": 0.5}, ValueError, r"visual_tokens and visual_ratio: give one"),
        ({"r": 8}, TypeError, r"r: .*pass visual_tokens= .* or visual_ratio="),
        ({"ratio": 0.5}, TypeError, r"ratio: .*pass visual_tokens= .* or visual_ratio="),
        ({"prop_attn": False}, TypeError, r"prop_attn: not an option for vision-language models"),
        ({"mode": "mean"}, TypeError, r"mode: not an option for vision-language models"),
    ],
)
def test_bad_options_are_clear_errors_and_change_nothing(settings, error, match):
    model = tome.patch(tiny_llava(), visual_tokens=16)
    with pytest.raises(error, match=match):
        tome.patch(model, **settings)
    assert model.tome.visual_tokens == 16  # the earlier patch is back
    with pytest.raises(error, match=match):
        tome.patch(tiny_llava(), **settings)


def test_handle_attributes_are_checked():
    model = tome.patch(tiny_llava())
    with pytest.raises(ValueError, match="visual_tokens"):
        model.tome.visual_tokens = 0
    with pytest.raises(ValueError, match="visual_ratio"):
        model.tome.visual_ratio = 1
    with pytest.raises(TypeError, match="visual_tokens"):
        model.tome.r = 4


def test_visual_options_on_other_models_name_the_family():
    bert = transformers.BertModel(
        transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"visual_tokens: an option of .*vision-language models"):
        tome.patch(bert, visual_tokens=64)


# -- proportional attention in the language model ---------------------------------------------------


def _merged_reference(model, inputs: dict, visual_tokens: int) -> dict:
    """The shortened prompt and merged features, built by hand from the pure pieces, and each
    image's merged token sizes: what the unpatched model reads without proportional attention."""
    image = model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    features = list(image.pooler_output)
    merged, sources = reduce_images_tracked(features, visual_tokens, None)
    after = [m.shape[0] for m in merged]
    short = shorten_prompts(
        inputs["input_ids"], inputs["attention_mask"], IMAGE, [64] * len(features), after, {}, pad_id=PAD
    )
    image.pooler_output = merged
    sizes = [torch.bincount(s, minlength=k) for s, k in zip(sources, after, strict=True)]
    return {"tensors": short.tensors, "image": image, "sizes": sizes}


@torch.no_grad()
def test_prop_attn_off_is_the_plain_merge():
    model = tiny_llava()
    inputs = _batch([ONE, TWO], images=3)
    ref = _merged_reference(model, inputs, 8)
    reference = _generate(model, {**ref["tensors"], "mm_encoder_outputs": {"image": ref["image"]}})
    tome.patch(model, visual_tokens=8, visual_prop_attn=False)
    out = _generate(model, inputs)
    width = inputs["input_ids"].shape[1]
    assert torch.equal(
        out.sequences[:, width:], reference.sequences[:, ref["tensors"]["input_ids"].shape[1] :]
    )
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))
    # on: the same prompt, other logits (the merged tokens weigh by their sizes)
    model.tome.visual_prop_attn = True
    assert not torch.allclose(_generate(model, inputs).logits[0], reference.logits[0], atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_every_layer_sees_log_sizes_in_the_prefill_and_every_decode_step(implementation):
    model = tiny_llava()
    model.set_attn_implementation(implementation)
    inputs = _batch([ONE, TWO], images=3)
    ref = _merged_reference(model, inputs, 8)
    ids, mask = ref["tensors"]["input_ids"], ref["tensors"]["attention_mask"]
    B, P = ids.shape
    expected = torch.zeros(B, P)
    expected[ids == IMAGE] = torch.cat(ref["sizes"]).float().log()  # batch order: row by row
    assert expected.max() > 0  # some merged tokens hold several
    tome.patch(model, visual_tokens=8)
    seen: dict[int, list] = {}
    layers = model.model.language_model.layers
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: seen.setdefault(i, []).append(kwargs["attention_mask"]),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]  # registered after tome's: they see what the attention gets
    try:
        _generate(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(seen) == list(range(len(layers)))
    for masks in seen.values():
        assert len(masks) == GREEDY["max_new_tokens"]
        for step, got in enumerate(masks):
            Q, K = (P, P) if step == 0 else (1, P + step)
            assert got.shape == (B, 1, Q, K) and got.is_floating_point()
            queries = torch.arange(K - Q, K)[:, None]
            allowed = (torch.arange(K)[None, :] <= queries)[None] & torch.cat(
                [mask.bool(), torch.ones(B, step, dtype=torch.bool)], 1
            )[:, None, :]
            bias = torch.cat([expected, torch.zeros(B, step)], 1)[:, None, :].expand(B, Q, K)
            got = got[:, 0]
            assert torch.equal(got[allowed], bias[allowed])  # log(size) on the merged keys, 0 else
            assert bool((got[~allowed] < -1e30).all())  # padding and the future stay masked
    # a direct forward: the prefill's bias, and none left behind after the call
    seen.clear()
    model(**inputs)
    assert model.tome._slot.bias is None


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_merged_token_of_size_s_attends_like_s_copies(implementation):
    # One attention layer without rotation (cos 1, sin 0), so that copies need no positions:
    # the text queries after [v1 (size 3), v2 (1), v3 (2)] read the same as after
    # [v1, v1, v1, v2, v3, v3].
    model = tome.patch(tiny_llava(), visual_tokens=8)
    model.set_attn_implementation(implementation)
    attention = model.model.language_model.layers[0].self_attn
    sizes = torch.tensor([3, 1, 2])
    visual, text = torch.randn(1, 3, 32), torch.randn(1, 2, 32)

    def run(hidden):
        n = hidden.shape[1]
        rotation = (torch.ones(1, n, 8), torch.zeros(1, n, 8))
        return attention(hidden_states=hidden, position_embeddings=rotation, attention_mask=None)[0]

    model.tome._slot.bias = torch.cat([sizes.float().log(), torch.zeros(2)])[None]
    try:
        merged = run(torch.cat([visual, text], 1))
    finally:
        model.tome._slot.bias = None
    copies = run(torch.cat([visual.repeat_interleave(sizes, dim=1), text], 1))
    torch.testing.assert_close(merged[:, -2:], copies[:, -2:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(run(torch.cat([visual, text], 1))[:, -2:], copies[:, -2:], atol=1e-4)
