"""Vision-language models (reduce once, before the decoder): transformers Idefics3 and SmolVLM on
tiny random configs (32 px tiles, patch 4, pixel shuffle by 2: 16 tokens a tile, Llama text).
Each tile's run of placeholders merges on its own and the framing text stays; generate(), the
prefill and KV-cache lengths, padded batches with different tile counts, several images a
prompt, proportional attention, copies and unpatch.
"""

from __future__ import annotations

import pytest
import torch

import tome
from tome.adapters.common.vlm import reduce_images_tracked, shorten_prompts

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "SmolVLMForConditionalGeneration"):
    pytest.skip("no Idefics3 / SmolVLM in this transformers", allow_module_level=True)

from _vlm import check_copies_and_unpatch  # noqa: E402
from _vlm_gemma_idefics import (  # noqa: E402
    FAKE,
    GLOBAL,
    IMAGE,
    PAD,
    TILE_TOKENS,
    attention_masks,
    idefics_batch,
    idefics_prompt,
    language_model_lengths,
    tiles,
    tiny_idefics3,
)

FAMILIES = ["idefics3", "smolvlm"]
ONE = ([1, 5, 6], [(2, 2)], [7, 8])  # one image: 2 x 2 crops + global = 5 tiles
TWO = ([1, 11], [(0, 0), (1, 2)], [12])  # two images: a global image alone; 1 x 2 crops + global
SHORT = ([1, 5], [(0, 0)], [7])
GREEDY = {"max_new_tokens": 5, "do_sample": False}


def _generate(model, inputs: dict, **kwargs):
    return model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True, **kwargs)


def _merged_reference(model, inputs: dict, visual_tokens: int) -> dict:
    """The shortened prompt and each tile's merged tokens built by hand from the pure pieces,
    and each tile's merged token sizes."""
    image = model.get_image_features(
        pixel_values=inputs["pixel_values"],
        pixel_attention_mask=inputs["pixel_attention_mask"],
        return_dict=True,
    )
    features = list(torch.cat(image.pooler_output).view(-1, TILE_TOKENS, 32))
    merged, sources = reduce_images_tracked(features, visual_tokens, None)
    after = [m.shape[0] for m in merged]
    short = shorten_prompts(
        inputs["input_ids"],
        inputs["attention_mask"],
        IMAGE,
        [TILE_TOKENS] * len(features),
        after,
        {},
        pad_id=PAD,
    )
    image.pooler_output = merged
    sizes = [torch.bincount(s, minlength=k) for s, k in zip(sources, after, strict=True)]
    return {"tensors": short.tensors, "image": image, "sizes": sizes}


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "settings", [{"visual_ratio": 0.0}, {"visual_tokens": TILE_TOKENS}, {"visual_tokens": 1000}]
)
def test_no_merging_is_exact(family, settings):
    model = tiny_idefics3(family)
    inputs = idefics_batch([ONE, TWO])
    logits = model(**inputs).logits
    reference = _generate(model, inputs)
    tome.patch(model, **settings)
    assert torch.equal(model(**inputs).logits, logits)
    out = _generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("settings", "kept"), [({"visual_tokens": 5}, 5), ({"visual_ratio": 0.75}, 4), ({}, 4)]
)
def test_the_prefill_and_the_cache_shrink_by_the_merged_tokens(family, settings, kept):
    model = tome.patch(tiny_idefics3(family), **settings)
    inputs = idefics_batch([ONE, TWO])
    width = inputs["input_ids"].shape[1]
    lengths = [len(idefics_prompt(*row)) - tiles(row[1]) * (TILE_TOKENS - kept) for row in (ONE, TWO)]
    calls = language_model_lengths(model, lambda: _generate(model, inputs))
    assert calls[0] == max(lengths)
    assert calls[1:] == [1] * (GREEDY["max_new_tokens"] - 1)  # each decode step unchanged
    out = _generate(model, inputs)
    assert out.cache.get_seq_length() == calls[0] + GREEDY["max_new_tokens"] - 1
    assert torch.equal(out.sequences[:, :width], inputs["input_ids"])  # the prompts as given
    assert out.sequences.shape == (2, width + GREEDY["max_new_tokens"])
    assert language_model_lengths(model, lambda: model(**inputs)) == [calls[0]]


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_each_tile_keeps_its_framing_and_its_own_merged_tokens(family):
    # prop attn off: the unpatched model on the hand-made prompt (each tile's run shortened,
    # every framing token kept) reads exactly what the patched one does
    model = tiny_idefics3(family)
    inputs = idefics_batch([ONE, TWO])
    ref = _merged_reference(model, inputs, 3)
    ids = ref["tensors"]["input_ids"]
    for row, (given, short) in enumerate(zip(inputs["input_ids"], ids, strict=True)):
        assert torch.equal(
            given[given != IMAGE][given[given != IMAGE] != PAD], short[(short != IMAGE) & (short != PAD)]
        )
        assert int((short == IMAGE).sum()) == 3 * tiles([ONE, TWO][row][1])
        runs = torch.diff(torch.cat([torch.tensor([0]), (short == IMAGE).int(), torch.tensor([0])]))
        starts, ends = (runs == 1).nonzero().squeeze(1), (runs == -1).nonzero().squeeze(1)
        assert ((ends - starts) == 3).all()  # one run of 3 a tile
        assert all(
            short[s - 2] == FAKE for s in starts.tolist()
        )  # each after FAKE <row_r_col_c> / <global-img>
    assert (ids == GLOBAL).sum() == 3
    reference = _generate(model, {**ref["tensors"], "mm_encoder_outputs": {"image": ref["image"]}})
    tome.patch(model, visual_tokens=3, visual_prop_attn=False)
    out = _generate(model, inputs)
    width, short = inputs["input_ids"].shape[1], ids.shape[1]
    assert torch.equal(out.sequences[:, width:], reference.sequences[:, short:])
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))
    model.tome.visual_prop_attn = True
    assert not torch.allclose(_generate(model, inputs).logits[0], reference.logits[0], atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", [{"visual_tokens": 3}, {"visual_ratio": 0.5}])
def test_each_row_of_a_padded_batch_is_its_own_run(family, settings):
    model = tome.patch(tiny_idefics3(family), **settings)
    rows = [SHORT, TWO, ONE]
    inputs = idefics_batch(rows, seed=3)
    together = _generate(model, inputs)
    width = inputs["input_ids"].shape[1]
    for row, prompt in enumerate(rows):
        count = tiles(prompt[1])
        alone_inputs = idefics_batch([prompt])
        alone_inputs["pixel_values"] = inputs["pixel_values"][row : row + 1, :count]
        alone = _generate(model, alone_inputs)
        assert torch.equal(
            together.sequences[row, width:], alone.sequences[0, len(idefics_prompt(*prompt)) :]
        )
        torch.testing.assert_close(together.logits[0][row], alone.logits[0][0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_sampling_without_cache_and_positional_prompts(family):
    model = tome.patch(tiny_idefics3(family), visual_tokens=4)
    inputs = idefics_batch([ONE, TWO])
    width = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, width + 4)
    assert torch.equal(beams[:, :width], inputs["input_ids"].repeat_interleave(2, dim=0))
    sampled = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
    assert sampled.shape == (2, width + 4)
    cached = model.generate(**inputs, **GREEDY)
    assert torch.equal(model.generate(**inputs, **GREEDY, use_cache=False), cached)
    ids = inputs.pop("input_ids")
    assert torch.equal(model.generate(ids, **inputs, **GREEDY), cached)
    # without pixel_attention_mask (full tiles): the same
    inputs.pop("pixel_attention_mask")
    assert torch.equal(model.generate(input_ids=ids, **inputs, **GREEDY), cached)


@torch.no_grad()
def test_text_only_prompts_and_mismatched_tiles():
    model = tiny_idefics3()
    text = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    reference = model.generate(**text, **GREEDY)
    tome.patch(model, visual_tokens=4)
    assert torch.equal(model.generate(**text, **GREEDY), reference)
    inputs = idefics_batch([ONE])
    inputs["pixel_values"] = torch.randn(1, 6, 3, 32, 32)  # six tiles, five tiles' placeholders
    inputs.pop("pixel_attention_mask")
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model.generate(**inputs, **GREEDY)


def test_labels_are_shortened_with_the_prompt():
    model = tome.patch(tiny_idefics3(), visual_tokens=4)
    inputs = idefics_batch([ONE, TWO])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels.masked_fill(labels == IMAGE, -100))
    assert out.logits.shape[1] == max(
        len(idefics_prompt(*row)) - tiles(row[1]) * (TILE_TOKENS - 4) for row in (ONE, TWO)
    )
    assert torch.isfinite(out.loss)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_copies_and_pickles(family):
    model = tiny_idefics3(family)
    inputs = idefics_batch([ONE, TWO])
    check_copies_and_unpatch(model, lambda m: _generate(m, inputs), visual_tokens=4)


# -- proportional attention in the language model ---------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_every_layer_sees_log_sizes_in_the_prefill_and_every_decode_step(family, implementation):
    model = tiny_idefics3(family)
    model.set_attn_implementation(implementation)
    inputs = idefics_batch([ONE, TWO])
    ref = _merged_reference(model, inputs, 5)
    ids, mask = ref["tensors"]["input_ids"], ref["tensors"]["attention_mask"]
    B, P = ids.shape
    expected = torch.zeros(B, P)
    expected[ids == IMAGE] = torch.cat(ref["sizes"]).float().log()  # tiles in batch order
    assert expected.max() > 0
    tome.patch(model, visual_tokens=5)
    seen = attention_masks(model, lambda: _generate(model, inputs))
    assert sorted(seen) == [0, 1]
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
            assert torch.equal(got[allowed], bias[allowed])
            assert bool((got[~allowed] < -1e30).all())
    model(**inputs)
    assert model.tome._slot.bias is None


def test_the_adapter_serves_both_classes():
    from tome.runtime.registry import adapter_for

    for family in FAMILIES:
        model = tome.patch(tiny_idefics3(family), visual_ratio=0.5)
        assert adapter_for(model).name == "transformers_idefics3"
        assert model.tome.visual_ratio == 0.5
