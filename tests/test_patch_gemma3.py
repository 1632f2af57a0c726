"""Vision-language models (reduce once, before the decoder): transformers Gemma 3 on a tiny random
config (SigLIP + Gemma 3 text with a sliding-window and a global layer). generate(), the prefill
and KV-cache lengths, the bidirectional image blocks (``token_type_ids``), padded batches,
several images a prompt, proportional attention in sliding-window layers, copies and unpatch.
"""

from __future__ import annotations

import pytest
import torch

import tome
from tome.adapters.common.vlm import reduce_images_tracked, shorten_prompts

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma3ForConditionalGeneration"):
    pytest.skip("no Gemma 3 in this transformers", allow_module_level=True)

from _vlm import check_copies_and_unpatch  # noqa: E402
from _vlm_gemma_idefics import (  # noqa: E402
    GEMMA_TOKENS,
    IMAGE,
    PAD,
    SLIDING_WINDOW,
    attention_masks,
    gemma_batch,
    gemma_prompt,
    language_model_lengths,
    tiny_gemma3,
)

ONE = ([1, 5, 6], 1, [7, 8, 9])  # 3 + 18 + 3 = 24 tokens
TWO = ([1, 11], 2, [12, 13])  # 2 + 36 + 2 = 40 tokens
SHORT = ([1, 5], 1, [7])
GREEDY = {"max_new_tokens": 5, "do_sample": False}


def _generate(model, inputs: dict, **kwargs):
    return model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True, **kwargs)


def _merged_reference(model, inputs: dict, visual_tokens: int) -> dict:
    """The shortened prompt (``token_type_ids`` included) and merged soft tokens built by hand
    from the pure pieces, and each image's merged token sizes."""
    image = model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    features = list(image.pooler_output)
    merged, sources = reduce_images_tracked(features, visual_tokens, None)
    after = [m.shape[0] for m in merged]
    extra = {"token_type_ids": inputs["token_type_ids"]} if "token_type_ids" in inputs else {}
    short = shorten_prompts(
        inputs["input_ids"], inputs["attention_mask"], IMAGE, [GEMMA_TOKENS] * len(features), after, extra,
        pad_id=PAD,
    )  # fmt: skip
    image.pooler_output = torch.stack(merged)
    sizes = [torch.bincount(s, minlength=k) for s, k in zip(sources, after, strict=True)]
    return {"tensors": short.tensors, "image": image, "sizes": sizes}


@torch.no_grad()
@pytest.mark.parametrize(
    "settings", [{"visual_ratio": 0.0}, {"visual_tokens": GEMMA_TOKENS}, {"visual_tokens": 1000}]
)
def test_no_merging_is_exact(settings):
    model = tiny_gemma3()
    inputs = gemma_batch([ONE, TWO])
    logits = model(**inputs).logits
    reference = _generate(model, inputs)
    tome.patch(model, **settings)
    assert torch.equal(model(**inputs).logits, logits)
    out = _generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))


@torch.no_grad()
@pytest.mark.parametrize(
    ("settings", "kept"), [({"visual_tokens": 5}, 5), ({"visual_ratio": 0.75}, 4), ({}, 4)]
)
def test_the_prefill_and_the_cache_shrink_by_the_merged_tokens(settings, kept):
    model = tome.patch(tiny_gemma3(), **settings)
    inputs = gemma_batch([ONE, TWO])
    width = inputs["input_ids"].shape[1]  # 40: the row with two images
    lengths = language_model_lengths(model, lambda: _generate(model, inputs))
    assert lengths[0] == width - 2 * (GEMMA_TOKENS - kept)
    assert lengths[1:] == [1] * (GREEDY["max_new_tokens"] - 1)  # each decode step unchanged
    out = _generate(model, inputs)
    assert out.cache.get_seq_length() == lengths[0] + GREEDY["max_new_tokens"] - 1
    assert torch.equal(out.sequences[:, :width], inputs["input_ids"])  # the prompts as given
    assert out.sequences.shape == (2, width + GREEDY["max_new_tokens"])
    assert language_model_lengths(model, lambda: model(**inputs)) == [lengths[0]]


@torch.no_grad()
@pytest.mark.parametrize("types", [True, False])
def test_prop_attn_off_is_the_unpatched_model_on_the_merged_prompt(types):
    # token_type_ids shortened with the prompt: the unpatched model, given the hand-made shorter
    # prompt and merged tokens, reads exactly what the patched one does
    model = tiny_gemma3()
    inputs = gemma_batch([ONE, TWO], types=types)
    ref = _merged_reference(model, inputs, 5)
    if types:
        assert torch.equal(ref["tensors"]["token_type_ids"], (ref["tensors"]["input_ids"] == IMAGE).long())
    reference = _generate(model, {**ref["tensors"], "mm_encoder_outputs": {"image": ref["image"]}})
    tome.patch(model, visual_tokens=5, visual_prop_attn=False)
    out = _generate(model, inputs)
    width, short = inputs["input_ids"].shape[1], ref["tensors"]["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, width:], reference.sequences[:, short:])
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))
    model.tome.visual_prop_attn = True
    assert not torch.allclose(_generate(model, inputs).logits[0], reference.logits[0], atol=1e-6)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Where a mask (bool, or float additive) lets a query attend."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_each_image_is_one_bidirectional_block_of_its_kept_tokens(implementation):
    model = tiny_gemma3(sliding_window=64)  # the window does not bind: the block alone shows
    model.set_attn_implementation(implementation)
    tome.patch(model, visual_tokens=5, visual_prop_attn=False)
    inputs = gemma_batch([ONE, TWO])
    masks = attention_masks(model, lambda: model(**inputs))
    ids = _merged_reference(model, inputs, 5)["tensors"]["input_ids"]
    B, P = ids.shape
    for layer in masks.values():
        allowed = _allowed(layer[0])[:, 0]
        assert allowed.shape == (B, P, P)
        for row in range(B):
            where = (ids[row] == IMAGE).nonzero().squeeze(1).tolist()
            blocks = [where[i : i + 5] for i in range(0, len(where), 5)]  # each image's kept tokens
            for block in blocks:
                assert block == list(range(block[0], block[0] + 5))  # contiguous, between boi / eoi
                assert ids[row, block[0] - 1] == 97 and ids[row, block[-1] + 1] == 96
                assert allowed[row][block][:, block].all()  # the whole image, both ways
                assert not allowed[row, block[0] - 1, block].any()  # boi: causal, sees no image
                assert not allowed[row, block[-1], block[-1] + 1 :].any()  # nothing after the image
            if len(blocks) == 2:  # an image never sees the next one
                assert not allowed[row][blocks[0]][:, blocks[1]].any()


@torch.no_grad()
@pytest.mark.parametrize("settings", [{"visual_tokens": 3}, {"visual_ratio": 0.5}])
def test_each_row_of_a_padded_batch_is_its_own_run(settings):
    model = tome.patch(tiny_gemma3(), **settings)
    inputs = gemma_batch([SHORT, TWO, ONE], seed=3)
    together = _generate(model, inputs)
    pixels = inputs["pixel_values"]
    width = inputs["input_ids"].shape[1]
    for row, (prompt, images) in enumerate([(SHORT, pixels[:1]), (TWO, pixels[1:3]), (ONE, pixels[3:])]):
        alone = _generate(model, {**gemma_batch([prompt]), "pixel_values": images})
        assert torch.equal(together.sequences[row, width:], alone.sequences[0, len(gemma_prompt(*prompt)) :])
        torch.testing.assert_close(together.logits[0][row], alone.logits[0][0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_beam_search_sampling_without_cache_and_positional_prompts():
    model = tome.patch(tiny_gemma3(), visual_tokens=4)
    inputs = gemma_batch([ONE, TWO])
    width = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, width + 4)
    assert torch.equal(beams[:, :width], inputs["input_ids"].repeat_interleave(2, dim=0))
    sampled = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
    assert sampled.shape == (2, width + 4)
    assert model.generate(**inputs, max_length=width + 3, do_sample=False).shape == (2, width + 3)
    cached = model.generate(**inputs, **GREEDY)
    assert torch.equal(model.generate(**inputs, **GREEDY, use_cache=False), cached)
    ids = inputs.pop("input_ids")
    assert torch.equal(model.generate(ids, **inputs, **GREEDY), cached)


@torch.no_grad()
def test_text_only_prompts_and_mismatched_images():
    model = tiny_gemma3()
    text = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    reference = model.generate(**text, **GREEDY)
    tome.patch(model, visual_tokens=4)
    assert torch.equal(model.generate(**text, **GREEDY), reference)
    inputs = gemma_batch([ONE])
    inputs["pixel_values"] = torch.randn(2, 3, 32, 32)  # two images, one image's placeholders
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model.generate(**inputs, **GREEDY)


def test_labels_are_shortened_with_the_prompt():
    model = tome.patch(tiny_gemma3(), visual_tokens=4)
    inputs = gemma_batch([ONE, TWO])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels.masked_fill(labels == IMAGE, -100))
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - 2 * (GEMMA_TOKENS - 4)
    assert torch.isfinite(out.loss)


@torch.no_grad()
def test_unpatch_copies_and_pickles():
    model = tiny_gemma3()
    inputs = gemma_batch([ONE, TWO])
    check_copies_and_unpatch(model, lambda m: _generate(m, inputs), visual_tokens=4)


# -- proportional attention, global and sliding-window layers ---------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_every_layer_sees_log_sizes_in_the_prefill_and_every_decode_step(implementation):
    model = tiny_gemma3()
    model.set_attn_implementation(implementation)
    inputs = gemma_batch([ONE, TWO])
    ref = _merged_reference(model, inputs, 5)
    ids = ref["tensors"]["input_ids"]
    B, P = ids.shape
    expected = torch.zeros(B, P)
    expected[ids == IMAGE] = torch.cat(ref["sizes"]).float().log()
    assert expected.max() > 0 and P > SLIDING_WINDOW  # the window binds from the first decode step
    tome.patch(model, visual_tokens=5, visual_prop_attn=False)
    plain = attention_masks(model, lambda: _generate(model, inputs))
    model.tome.visual_prop_attn = True
    biased = attention_masks(model, lambda: _generate(model, inputs))
    shifted = 0
    assert sorted(biased) == [0, 1]  # layer 0 slides, layer 1 is global
    for layer, masks in biased.items():
        assert len(masks) == GREEDY["max_new_tokens"]
        for step, (got, mask) in enumerate(zip(masks, plain[layer], strict=True)):
            Q = P if step == 0 else 1
            K = got.shape[-1]
            dropped = P + step - K  # the keys the sliding window no longer holds
            assert got.shape == (B, 1, Q, K) and got.is_floating_point() and mask.shape[-1] == K
            assert dropped == 0 or (layer == 0 and K == SLIDING_WINDOW)
            shifted += dropped > 0
            allowed = _allowed(mask)
            bias = torch.cat([expected, torch.zeros(B, step)], 1)[:, dropped:][:, None, None, :].expand_as(
                got
            )
            assert torch.equal(got[allowed], bias[allowed])  # log(size) on the merged keys, 0 else
            assert bool((got[~allowed] < -1e30).all())
            if layer == 0 and step > 0:
                assert bias[allowed].abs().sum() > 0  # merged keys inside the window get theirs
    assert shifted == GREEDY["max_new_tokens"] - 1
    model(**inputs)
    assert model.tome._slot.bias is None  # none left behind after a direct call


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", [0, 1])
def test_a_merged_token_of_size_s_attends_like_s_copies(implementation, layer):
    # Gemma 3's own scaling (query_pre_attn_scalar) and q / k norms, no rotation (cos 1, sin 0)
    model = tome.patch(tiny_gemma3(), visual_tokens=4)
    model.set_attn_implementation(implementation)
    attention = model.model.language_model.layers[layer].self_attn
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


def test_the_adapter_and_a_flash_attention_refusal():
    model = tome.patch(tiny_gemma3(), visual_tokens=4)
    assert type(model.tome).__name__ == "VisualHandle"
    assert tome.runtime.registry.adapter_for(model).name == "transformers_gemma3"
    attention = model.model.language_model.layers[1].self_attn
    model.tome._slot.bias = torch.zeros(1, 3)
    attention.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(NotImplementedError, match="visual_prop_attn"):
            attention(hidden_states=torch.randn(1, 3, 32), position_embeddings=(torch.ones(1, 3, 8), torch.zeros(1, 3, 8)), attention_mask=None)  # fmt: skip
    finally:
        model.tome._slot.bias = None
        attention.config._attn_implementation = "sdpa"
