"""LLaVA-NeXT and LLaVA-OneVision (AnyRes crops, ``image_newline``; reduce once, before the
decoder) on tiny random configs: what the contract test does not cover. generate(), the prefill
and KV-cache lengths, padded batches of images of different sizes, several images per prompt,
proportional attention, OneVision's videos (unmerged), and the pure merge of packed features.
"""

from __future__ import annotations

import pytest
import torch
from _vlm import IMAGE, PAD, VIDEO, check_copies_and_unpatch, language_model_calls
from _vlm_next import (
    anyres_batch,
    image_token_counts,
    row_inputs,
    tiny_llava_next,
    tiny_onevision,
)

import tome
from tome.adapters.common.anyres import newline_mask, reduce_packed
from tome.adapters.common.vlm import kept_tokens, shorten_prompts
from tome.core import merge as M

transformers = pytest.importorskip("transformers")

FAMILIES = {"next": tiny_llava_next, "onevision": tiny_onevision}
ONE = [1, 5, 6, (32, 32), 7, 8, 9]  # a 2x2 grid of crops
TWO = [1, 11, (16, 32), 12, (20, 30), 13]  # two images of other sizes (OneVision: no crops)
SHORT = [1, 5, (10, 40), 7]
GREEDY = {"max_new_tokens": 5, "do_sample": False}


def _generate(model, inputs: dict, **kwargs):
    return model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True, **kwargs)


def _lengths(model, run) -> list[int]:
    """The sequence lengths the language model reads, call by call (the first: the prefill)."""
    return [call["length"] for call in language_model_calls(model, run)]


def _encoder_inputs(inputs: dict) -> dict:
    return {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images") if k in inputs}


# -- the pure merge of packed features ------------------------------------------------------------


def _packed(base: int, rows: int, cols: int, newline: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """An image as the model packs it: ``base`` tokens, then ``rows`` rows of ``cols`` tokens and
    the newline."""
    grid = [torch.cat([torch.randn(cols, newline.shape[0], generator=g), newline[None]]) for _ in range(rows)]
    return torch.cat([torch.randn(base, newline.shape[0], generator=g), *grid])


def test_newlines_become_one_last_token_of_their_count_and_the_rest_merges_exactly():
    g = torch.Generator().manual_seed(0)
    newline = torch.randn(8, generator=g, dtype=torch.float64)
    image = _packed(16, 6, 5, newline, g)  # 16 + 6 * (5 + 1) = 52 tokens, 6 newlines
    assert newline_mask(image, newline).sum() == 6
    merged, sources = reduce_packed([image], newline, visual_tokens=10, visual_ratio=None)
    merged, source = merged[0], sources[0]
    assert merged.shape == (10, 8)
    assert torch.equal(merged[-1], newline)
    assert torch.equal(source[newline_mask(image, newline)], torch.full((6,), 9))
    assert torch.bincount(source).tolist()[-1] == 6
    # every other merged token: the exact mean of the visual tokens it holds
    for j in range(9):
        torch.testing.assert_close(merged[j], image[source == j].mean(0))
    assert not newline_mask(merged[:-1], newline).any()


def test_each_image_merges_by_itself_whatever_the_others_sizes():
    g = torch.Generator().manual_seed(1)
    newline = torch.randn(8, generator=g)
    images = [_packed(16, 6, 5, newline, g), _packed(16, 8, 8, newline, g), _packed(16, 6, 5, newline, g)]
    images.append(torch.cat([torch.randn(16, 8, generator=g), newline[None]]))  # no crops: one newline
    for settings in (
        {"visual_tokens": 7, "visual_ratio": None},
        {"visual_tokens": None, "visual_ratio": 0.75},
    ):
        together, sources = reduce_packed(images, newline, **settings)
        assert [t.shape[0] for t in together] == [kept_tokens(i.shape[0], **settings) for i in images]
        for image, merged, source in zip(images, together, sources, strict=True):
            alone, alone_source = reduce_packed([image], newline, **settings)
            assert torch.equal(merged, alone[0]) and torch.equal(source, alone_source[0])


def test_the_edges_of_reduce_packed():
    g = torch.Generator().manual_seed(2)
    newline = torch.randn(8, generator=g)
    image = _packed(16, 4, 4, newline, g)  # 36 tokens: 32 visual, 4 newlines
    same, source = reduce_packed([image], newline, visual_tokens=36, visual_ratio=None)
    assert same[0] is image and torch.equal(source[0], torch.arange(36))
    # one token fewer: only the newlines merge (33 tokens: all 32 visual ones, one newline)
    only, _ = reduce_packed([image], newline, visual_tokens=35, visual_ratio=None)
    assert torch.equal(only[0], torch.cat([image[~newline_mask(image, newline)], newline[None]]))
    # at least one visual token and the newline
    assert reduce_packed([image], newline, visual_tokens=1, visual_ratio=None)[0][0].shape[0] == 2
    # no newline (a packing without one): k tokens, as LLaVA's merge
    plain = torch.randn(20, 8, generator=g)
    assert reduce_packed([plain], None, visual_tokens=5, visual_ratio=None)[0][0].shape[0] == 5
    history_check, source = reduce_packed([plain], newline, visual_tokens=5, visual_ratio=None)
    torch.testing.assert_close(history_check[0], M.merge_original(_history(source[0], 5), plain[None])[0])


def _history(source: torch.Tensor, k: int) -> M.MergeHistory:
    """The merge history a source map stands for (to check the means with tome's own helper)."""
    sizes = torch.bincount(source, minlength=k).float()[None]
    return M.MergeHistory(source=source[None], sizes=sizes)


# -- the models -------------------------------------------------------------------------------------


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@torch.no_grad()
@pytest.mark.parametrize("settings", [{"visual_ratio": 0.0}, {"visual_tokens": 88}, {"visual_tokens": 1000}])
def test_no_merging_is_exact(family, settings):
    model = FAMILIES[family]()
    inputs = anyres_batch(model, [ONE, TWO])
    assert max(image_token_counts(model, inputs)) <= 88
    logits = model(**inputs).logits
    reference = _generate(model, inputs)
    tome.patch(model, **settings)
    assert torch.equal(model(**inputs).logits, logits)
    out = _generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert torch.equal(out.logits[0], reference.logits[0])


@torch.no_grad()
@pytest.mark.parametrize("settings", [{"visual_tokens": 10}, {"visual_ratio": 0.75}])
def test_the_prefill_and_the_cache_shrink_by_the_merged_tokens(family, settings):
    model = FAMILIES[family]()
    rows = [ONE, TWO, SHORT]
    inputs = anyres_batch(model, rows)
    counts = image_token_counts(model, inputs)
    assert len(set(counts)) > 1  # images of different sizes: different token counts
    kept = [kept_tokens(n, settings.get("visual_tokens"), settings.get("visual_ratio")) for n in counts]
    per_row = [sum(isinstance(x, tuple) for x in row) for row in rows]
    lengths, start = [], 0
    for row, images in enumerate(per_row):
        removed = sum(
            n - k for n, k in zip(counts[start : start + images], kept[start : start + images], strict=True)
        )
        lengths.append(int(inputs["attention_mask"][row].sum()) - removed)
        start += images
    tome.patch(model, **settings)
    seen = _lengths(model, lambda: _generate(model, inputs))
    assert seen[0] == max(lengths)
    assert seen[1:] == [1] * (GREEDY["max_new_tokens"] - 1)  # each decode step unchanged
    out = _generate(model, inputs)
    assert out.cache.get_seq_length() == seen[0] + GREEDY["max_new_tokens"] - 1
    width = inputs["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :width], inputs["input_ids"])  # the prompts as given
    assert out.sequences.shape == (3, width + GREEDY["max_new_tokens"])
    assert _lengths(model, lambda: model(**inputs)) == [seen[0]]  # a direct forward too


@torch.no_grad()
@pytest.mark.parametrize("settings", [{"visual_tokens": 8}, {"visual_ratio": 0.5}])
def test_each_row_of_a_padded_batch_is_its_own_run(family, settings):
    model = tome.patch(FAMILIES[family](), **settings)
    rows = [SHORT, TWO, ONE]
    inputs = anyres_batch(model, rows, seed=3)
    together = _generate(model, inputs)
    width = inputs["input_ids"].shape[1]
    for row in range(len(rows)):
        alone = _generate(model, row_inputs(model, rows, row, seed=3))
        length = alone.sequences.shape[1] - GREEDY["max_new_tokens"]
        assert torch.equal(together.sequences[row, width:], alone.sequences[0, length:])
        torch.testing.assert_close(together.logits[0][row], alone.logits[0][0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_beam_search_sampling_without_cache_and_positional_prompts(family):
    model = tome.patch(FAMILIES[family](), visual_tokens=8)
    inputs = anyres_batch(model, [ONE, TWO])
    width = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, width + 3)
    assert torch.equal(beams[:, :width], inputs["input_ids"].repeat_interleave(2, dim=0))
    sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5)
    assert sampled.shape == (2, width + 3)
    assert model.generate(**inputs, max_length=width + 2, do_sample=False).shape == (2, width + 2)
    cached = _generate(model, inputs)
    uncached = _generate(model, inputs, use_cache=False)
    assert torch.equal(uncached.sequences, cached.sequences)
    torch.testing.assert_close(uncached.logits[-1], cached.logits[-1], rtol=1e-4, atol=1e-4)
    # each step without a cache reads the whole shortened prompt and the new tokens
    seen = _lengths(model, lambda: _generate(model, inputs, use_cache=False))
    assert seen == [seen[0] + step for step in range(GREEDY["max_new_tokens"])]
    ids = inputs.pop("input_ids")
    assert torch.equal(
        model.generate(ids, **inputs, **GREEDY), model.generate(input_ids=ids, **inputs, **GREEDY)
    )


@torch.no_grad()
def test_a_forward_with_labels_reads_the_shortened_prompt(family):
    model = tome.patch(FAMILIES[family](), visual_tokens=8)
    inputs = anyres_batch(model, [ONE])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, -100)
    out = model(**inputs, labels=labels)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - (image_token_counts(model, inputs)[0] - 8)
    assert torch.isfinite(out.loss)


@torch.no_grad()
def test_text_only_and_mismatched_prompts_run_as_the_model_would(family):
    model = FAMILIES[family]()
    text = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    reference = model.generate(**text, **GREEDY)
    tome.patch(model, visual_tokens=8)
    assert torch.equal(model.generate(**text, **GREEDY), reference)
    inputs = anyres_batch(model, [ONE])
    first = int((inputs["input_ids"][0] == IMAGE).nonzero()[0])
    inputs["input_ids"][0, first] = 5  # one placeholder too few: the model's own error
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**inputs)


def test_copies_and_unpatch(family):
    model = FAMILIES[family]()
    inputs = anyres_batch(model, [ONE, SHORT])
    check_copies_and_unpatch(model, lambda m: _generate(m, inputs), visual_tokens=8)


# -- what the language model reads: the merged features and their sizes -----------------------------


def _merged_reference(model, inputs: dict, visual_tokens: int) -> dict:
    """The shortened prompt and merged features built by hand from the pure pieces, each image's
    merged token sizes, and its number of newlines."""
    image = model.get_image_features(**_encoder_inputs(inputs), return_dict=True)
    features = list(image.pooler_output)
    newline = model.model.image_newline
    merged, sources = reduce_packed(features, newline, visual_tokens, None)
    before, after = [f.shape[0] for f in features], [m.shape[0] for m in merged]
    short = shorten_prompts(
        inputs["input_ids"], inputs["attention_mask"], IMAGE, before, after, {}, pad_id=PAD
    )
    image.pooler_output = merged
    sizes = [torch.bincount(s, minlength=k) for s, k in zip(sources, after, strict=True)]
    rows = [int(newline_mask(f, newline).sum()) for f in features]
    return {"tensors": short.tensors, "image": image, "sizes": sizes, "rows": rows, "merged": merged}


@torch.no_grad()
def test_prop_attn_off_is_the_plain_merge_and_each_image_ends_with_its_newline(family):
    model = FAMILIES[family]()
    inputs = anyres_batch(model, [ONE, TWO])
    ref = _merged_reference(model, inputs, 8)
    newline = model.model.image_newline
    for merged, sizes, rows in zip(ref["merged"], ref["sizes"], ref["rows"], strict=True):
        assert merged.shape[0] == 8 and torch.equal(merged[-1], newline) and int(sizes[-1]) == rows >= 1
    reference = _generate(model, {**ref["tensors"], "mm_encoder_outputs": {"image": ref["image"]}})
    tome.patch(model, visual_tokens=8, visual_prop_attn=False)
    out = _generate(model, inputs)
    width = inputs["input_ids"].shape[1]
    short = ref["tensors"]["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, width:], reference.sequences[:, short:])
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))
    model.tome.visual_prop_attn = True  # the same prompt, other logits (sizes weigh)
    assert not torch.allclose(_generate(model, inputs).logits[0], reference.logits[0], atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_every_layer_sees_log_sizes_in_the_prefill_and_every_decode_step(family, implementation):
    model = FAMILIES[family]()
    model.set_attn_implementation(implementation)
    inputs = anyres_batch(model, [ONE, TWO])
    ref = _merged_reference(model, inputs, 8)
    ids, mask = ref["tensors"]["input_ids"], ref["tensors"]["attention_mask"]
    B, P = ids.shape
    expected = torch.zeros(B, P)
    expected[ids == IMAGE] = torch.cat(ref["sizes"]).float().log()  # batch order: row by row
    assert expected.max() > 0
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
    model(**inputs)
    assert model.tome._slot.bias is None  # none left behind after a direct call


# -- OneVision's videos left as they are (video_ratio=None; merged: test_patch_video_families.py) -------------------------------------------------------------------


def _with_video(inputs: dict, where: int = 2, frames: int = 2) -> dict:
    """``inputs`` (one row) with a video of ``frames`` frames after its first ``where`` tokens:
    OneVision packs each frame to 2x2 pooled tokens, then one newline: ``4 * frames + 1``."""
    videos = torch.randn(1, frames, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    ids = inputs["input_ids"]
    ids = torch.cat([ids[:, :where], torch.full((1, 4 * frames + 1), VIDEO), ids[:, where:]], 1)
    return {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": videos}


@torch.no_grad()
def test_onevision_videos_with_video_ratio_none_run_unmerged_next_to_merged_images():
    model = tiny_onevision()
    video_only = _with_video(anyres_batch(model, [[1, 5, 6, 7]]))
    reference = _generate(model, video_only)
    inputs = _with_video(anyres_batch(model, [ONE]))
    ref = _merged_reference(model, {k: v for k, v in inputs.items() if k != "pixel_values_videos"}, 8)
    video = model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"], return_dict=True)
    by_hand = _generate(
        model, {**ref["tensors"], "mm_encoder_outputs": {"image": ref["image"], "video": video}}
    )
    tome.patch(model, visual_tokens=8, visual_prop_attn=False, video_ratio=None)
    out = _generate(model, video_only)  # videos alone: the model's own run
    assert torch.equal(out.sequences, reference.sequences) and torch.equal(out.logits[0], reference.logits[0])
    out = _generate(model, inputs)
    assert torch.equal(out.logits[0], by_hand.logits[0])  # the video's 9 placeholders all stay
    n = image_token_counts(model, inputs)[0]
    assert _lengths(model, lambda: model(**inputs)) == [inputs["input_ids"].shape[1] - (n - 8)]
    assert (ref["tensors"]["input_ids"] == VIDEO).sum() == 9
