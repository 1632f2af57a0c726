"""Vision-language models (reduce once, before the decoder): transformers InternVL on tiny random
configs. An image is all its tiles (one run of placeholders); generate(), the prefill and KV-cache
lengths, padded batches with images of different tile counts, proportional attention, unpatch.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tome
from tome.adapters.common.vlm import reduce_images_tracked

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "InternVLForConditionalGeneration"):
    pytest.skip("no InternVL in this transformers", allow_module_level=True)

from _vlm import IMAGE, PAD, check_copies_and_unpatch, language_model_calls  # noqa: E402
from _vlm_internvl_qwen3 import (  # noqa: E402
    TILE,
    attention_masks,
    check_log_sizes,
    internvl_batch,
    internvl_prompt,
    kept_prompt,
    tiny_internvl,
)

from tome.adapters.transformers_internvl import image_runs  # noqa: E402

A = ([1, 5, 6], [3], [7, 8, 9])  # one image of 3 tiles: 48 tokens
B = ([1, 11], [1, 2], [12, 13])  # two images: 16 and 32 tokens
C = ([1, 5], [1], [7])  # one image of one tile: 16 tokens
GREEDY = {"max_new_tokens": 5, "do_sample": False}


def _generate(model, inputs: dict, **kwargs):
    return model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True, **kwargs)


def _images(model, inputs: dict) -> list[torch.Tensor]:
    """Each image's features, all its tiles in order, as the adapter sees them."""
    tiles = model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    runs = image_runs(inputs["input_ids"], IMAGE)
    return list(tiles.reshape(-1, tiles.shape[-1]).split(runs))


def test_image_runs_are_one_per_image_row_by_row():
    ids = torch.tensor([[0, 0, 9, 9, 8, 9, 9, 9], [9, 9, 8, 7, 9, 8, 9, 9], [1, 2, 3, 4, 5, 6, 7, 8]])
    assert image_runs(ids, 9) == [2, 3, 2, 1, 2]
    assert image_runs(ids[2:], 9) == []


# -- the model -------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("settings", [{"visual_ratio": 0.0}, {"visual_tokens": 48}, {"visual_tokens": 1000}])
def test_no_merging_is_exact(settings):
    model = tiny_internvl()
    inputs = internvl_batch([A, B])
    logits = model(**inputs).logits
    reference = _generate(model, inputs)
    tome.patch(model, **settings)
    assert torch.equal(model(**inputs).logits, logits)
    out = _generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))


@torch.no_grad()
@pytest.mark.parametrize(
    ("settings", "kept"), [({"visual_tokens": 6}, [6, 6, 6]), ({"visual_ratio": 0.75}, [12, 4, 8])]
)
def test_the_prefill_and_the_cache_shrink_by_the_merged_tokens(settings, kept):
    model = tome.patch(tiny_internvl(), **settings)
    inputs = internvl_batch([A, B])
    width = inputs["input_ids"].shape[1]
    lengths = [
        len(internvl_prompt(*A)) - (48 - kept[0]),
        len(internvl_prompt(*B)) - (16 - kept[1] + 32 - kept[2]),
    ]
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
def test_an_image_merges_its_tiles_together():
    model = tiny_internvl()
    inputs = internvl_batch([A])
    (image,) = _images(model, inputs)
    assert image.shape[0] == 3 * TILE
    merged, (source,) = reduce_images_tracked([image], 6, None)
    # the groups cross tiles (tile t holds tokens t * 16 .. t * 16 + 15): merging the image, not each tile
    tile_of = torch.arange(3 * TILE) // TILE
    assert any(len(set(tile_of[source == j].tolist())) > 1 for j in range(6))
    tome.patch(model, visual_tokens=6)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True
    )
    try:
        model(**inputs)
    finally:
        hook.remove()
    short = torch.tensor([kept_prompt(internvl_prompt(*A), [6], len(internvl_prompt(*A)) - 42)])
    written = seen[0][short == IMAGE]  # what the language model reads at the image's 6 tokens
    torch.testing.assert_close(written, merged[0])
    for j in range(6):
        torch.testing.assert_close(written[j], image[source == j].mean(0))


@torch.no_grad()
@pytest.mark.parametrize("settings", [{"visual_tokens": 5}, {"visual_ratio": 0.5}])
def test_each_row_of_a_padded_batch_is_its_own_run(settings):
    model = tome.patch(tiny_internvl(), **settings)
    rows = [C, B, A]
    inputs = internvl_batch(rows, seed=3)
    together = _generate(model, inputs)
    first = 0
    for row, prompt in enumerate(rows):
        alone_inputs = internvl_batch([prompt])
        tiles = sum(prompt[1])
        alone_inputs["pixel_values"] = inputs["pixel_values"][first : first + tiles]
        first += tiles
        alone = _generate(model, alone_inputs)
        new = together.sequences[row, inputs["input_ids"].shape[1] :]
        own = alone.sequences[0, alone_inputs["input_ids"].shape[1] :]
        assert torch.equal(new[: len(own)], own)
        assert (new[len(own) :] == PAD).all()  # it stopped (eos) before the batch did
        torch.testing.assert_close(together.logits[0][row], alone.logits[0][0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_beam_search_sampling_without_cache_and_positional_prompts():
    model = tome.patch(tiny_internvl(), visual_ratio=0.5)  # images of different merged sizes
    inputs = internvl_batch([A, B])
    width = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, width + 3)
    assert torch.equal(beams[:, :width], inputs["input_ids"].repeat_interleave(2, dim=0))
    # beam search: each row's beams read that row's images (the first beam of a row alone = its greedy
    # continuation's first token, when the row's first token is decided)
    for row, prompt in enumerate([A, B]):
        alone = internvl_batch([prompt])
        alone["pixel_values"] = inputs["pixel_values"][:3] if row == 0 else inputs["pixel_values"][3:]
        solo = model.generate(**alone, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
        assert torch.equal(beams[2 * row : 2 * row + 2, width:], solo[:, alone["input_ids"].shape[1] :])
    assert model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5).shape == (2, width + 3)
    assert model.generate(**inputs, max_length=width + 2, do_sample=False).shape == (2, width + 2)
    cached = model.generate(**inputs, **GREEDY)
    assert torch.equal(model.generate(**inputs, **GREEDY, use_cache=False), cached)
    ids = inputs.pop("input_ids")
    assert torch.equal(model.generate(ids, **inputs, **GREEDY), cached)


def test_labels_are_shortened_with_the_prompt():
    model = tome.patch(tiny_internvl(), visual_tokens=4)
    inputs = internvl_batch([A, B])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == IMAGE, -100)
    out = model(**inputs, labels=labels)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - (16 - 4 + 32 - 4)
    assert torch.isfinite(out.loss)
    out.loss.backward()  # the merge carries gradients to the projector
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None


@torch.no_grad()
def test_text_only_prompts_and_mismatched_images():
    model = tiny_internvl()
    text = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    reference = model.generate(**text, **GREEDY)
    tome.patch(model, visual_tokens=4)
    assert torch.equal(model.generate(**text, **GREEDY), reference)
    inputs = internvl_batch([A])
    inputs["input_ids"][0, 5] = 50  # one placeholder fewer than the tiles' tokens
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model.generate(**inputs, **GREEDY)


@torch.no_grad()
def test_unpatch_copies_and_pickles():
    model = tiny_internvl()
    inputs = internvl_batch([A, B])
    check_copies_and_unpatch(model, lambda m: _generate(m, inputs), visual_tokens=4)


def test_the_options_and_bad_ones():
    model = tome.patch(tiny_internvl(), visual_tokens=64)
    assert type(model.tome).__name__ == "VisualHandle"
    assert model.tome.patch_options() == {"visual_tokens": 64, "visual_ratio": None, "visual_prop_attn": True}
    with pytest.raises(ValueError, match=r"visual_tokens: expected an int >= 1"):
        tome.patch(model, visual_tokens=0)
    with pytest.raises(TypeError, match=r"r: .*pass visual_tokens="):
        tome.patch(tiny_internvl(), r=8)
    assert model.tome.visual_tokens == 64


# -- proportional attention in the language model ---------------------------------------------------


@torch.no_grad()
def test_every_layer_sees_log_sizes_in_the_prefill_and_every_decode_step():
    model = tiny_internvl()
    rows = [C, B]
    inputs = internvl_batch(rows)
    merged, sources = reduce_images_tracked(_images(model, inputs), 5, None)
    sizes = torch.cat([torch.bincount(s, minlength=m.shape[0]) for s, m in zip(sources, merged, strict=True)])
    assert sizes.max() > 1
    tome.patch(model, visual_tokens=5)
    calls = []
    seen = attention_masks(
        model, lambda: calls.extend(language_model_calls(model, lambda: _generate(model, inputs)))
    )
    width = calls[0]["length"]
    short = torch.tensor([kept_prompt(internvl_prompt(*r), [5] * len(r[1]), width) for r in rows])
    assert len(seen) == len(model.model.language_model.layers)
    check_log_sizes(seen, short, sizes.float().log(), GREEDY["max_new_tokens"])


@torch.no_grad()
def test_prop_attn_off_leaves_the_attention_alone():
    model = tome.patch(tiny_internvl(), visual_tokens=5, visual_prop_attn=False)
    inputs = internvl_batch([C, B])
    out = _generate(model, inputs)
    twin = copy.deepcopy(model)
    for layer in twin.model.language_model.layers:
        layer.self_attn._forward_pre_hooks.clear()  # tome's proportional attention hooks
    plain = _generate(twin, inputs)
    assert torch.equal(out.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, plain.logits, strict=True))
    model.tome.visual_prop_attn = True
    assert not torch.allclose(_generate(model, inputs).logits[0], plain.logits[0], atol=1e-6)
