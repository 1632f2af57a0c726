"""LLaVA's ``vision_r``: merging inside the CLIP vision tower too (tome/adapters/common/tower.py),
on tiny random configs (a 4-layer CLIP tower, 64 patches an image, + Llama)."""

from __future__ import annotations

import pytest
import torch
from _vlm import IMAGE, PAD, TEXT, check_copies_and_unpatch, language_model_calls, tiny_qwen

import tome
from tome.adapters.common.tower import reduce_features_from, reduce_images_from
from tome.adapters.common.vlm import BIAS
from tome.adapters.transformers_llava import _reduced
from tome.core import merge as M

transformers = pytest.importorskip("transformers")

PATCHES = 64  # (32 px / 4 px) ** 2 per image (CLS dropped)
LAYERS = 4  # the model reads hidden_states[-2]: the output of layer 2


def tiny_llava(seed: int = 0, layers: int = LAYERS) -> torch.nn.Module:
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        image_size=32, patch_size=4,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=transformers.LlamaConfig(**TEXT), image_token_id=IMAGE
    )
    return transformers.LlavaForConditionalGeneration(config).eval()


def _batch(prompts: list[list[int]], images: int, seed: int = 1) -> dict:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    pixels = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


ONE = [1, 5, 6] + [IMAGE] * PATCHES + [7, 8, 9]  # 70 tokens, one image
TWO = [1, 11] + [IMAGE] * (2 * PATCHES) + [12, 13]  # 132 tokens, two images
GREEDY = {"max_new_tokens": 4, "do_sample": False}


def _generate(model, inputs: dict, **kwargs):
    return model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True, **kwargs)


def _tower(model) -> torch.nn.Module:
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def _tower_lengths(model, run) -> list[int]:
    """The number of tokens each CLIP layer reads, in the first tower call."""
    seen: list[int] = []
    layers = _tower(model).encoder.layers
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None).shape[1]), with_kwargs=True)
        for layer in layers
    ]  # fmt: skip
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen[: len(layers)]


# -- the pure pieces ------------------------------------------------------------------------------


def test_the_final_merge_is_the_size_weighted_mean_over_original_patches():
    # a tower history: 12 patches held by 5 tokens of sizes 3, 2, 4, 1, 2
    source = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4]] * 2)
    tower = M.MergeHistory(source, torch.tensor([[3.0, 2.0, 4.0, 1.0, 2.0]] * 2))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    merged, history = reduce_features_from(tower, x, 2)
    assert merged.shape == (2, 2, 8)
    assert history.sizes.sum(1).tolist() == [12.0, 12.0]
    # every original patch counts once: the mean over the patches of each final group
    torch.testing.assert_close(merged, M.merge_original(history, M.unmerge(tower.source, x)))
    # and the source map is the tower's composed with the final merge's
    assert torch.equal(torch.stack([h.bincount(minlength=2) for h in history.source]).float(), history.sizes)


def test_reduce_images_from_counts_kept_tokens_from_the_original_tokens():
    tower = M.MergeHistory(
        torch.arange(16).div(2, rounding_mode="floor")[None].expand(3, 16), torch.full((3, 8), 2.0)
    )
    features = list(torch.randn(3, 8, 4))
    merged, sources = reduce_images_from(features, tower, None, 0.75)  # 16 -> 4
    assert [m.shape[0] for m in merged] == [4, 4, 4] and [s.shape[0] for s in sources] == [16] * 3
    merged, _ = reduce_images_from(features, tower, 10, None)  # the tower left 8 < 10: as is
    assert all(torch.equal(a, b) for a, b in zip(merged, features, strict=True))


# -- the model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("vision_r", [None, 0, [0, 0]])
def test_no_merging_in_the_tower_is_exact(vision_r):
    model = tiny_llava()
    inputs = _batch([ONE], 1)
    reference = _generate(tome.patch(model, visual_tokens=16), inputs)
    out = _generate(tome.patch(model, visual_tokens=16, vision_r=vision_r), inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))


def test_the_tower_runs_on_fewer_tokens_and_the_language_model_reads_visual_tokens():
    model = tiny_llava()
    inputs = _batch([ONE, TWO], 3)
    unmerged = _tower_lengths(model, lambda: _generate(model, inputs))
    assert unmerged == [PATCHES + 1] * LAYERS
    tome.patch(model, visual_tokens=16, vision_r=8)
    assert _tower_lengths(model, lambda: _generate(model, inputs)) == [65, 57, 49, 41]
    calls = language_model_calls(model, lambda: _generate(model, inputs))
    assert calls[0]["length"] == len(TWO) - 2 * (PATCHES - 16)  # the longest row, 2 images
    assert all(call["length"] == 1 for call in calls[1:])
    # the schedule is settable: (r, inflection) and a list, as tome.patch(vit, r=...) takes them
    model.tome.vision_r = [4, 4, 4]
    assert _tower_lengths(model, lambda: _generate(model, inputs)) == [65, 61, 57, 53]
    model.tome.vision_r = (8, -1.0)  # 16, 10, 5, 0
    assert _tower_lengths(model, lambda: _generate(model, inputs)) == [65, 49, 39, 34]


def test_without_a_final_merge_the_language_model_reads_the_towers_tokens():
    model = tome.patch(tiny_llava(), visual_ratio=0, vision_r=8)  # layer 2's output: 65 - 24, CLS dropped
    calls = language_model_calls(model, lambda: _generate(model, _batch([ONE], 1)))
    assert calls[0]["length"] == len(ONE) - PATCHES + 40
    model.tome.visual_tokens = 100  # more than the tower left: as is
    calls = language_model_calls(model, lambda: _generate(model, _batch([ONE], 1)))
    assert calls[0]["length"] == len(ONE) - PATCHES + 40


@pytest.mark.parametrize("settings", [{"visual_tokens": 16}, {"visual_ratio": 0.75}, {"visual_ratio": 0}])
def test_proportional_attention_sizes_count_every_patch_once(settings):
    model = tome.patch(tiny_llava(), vision_r=8, **settings)
    inputs = _batch([TWO, ONE], 3)
    rewritten, _ = _reduced(model, model.tome, inputs["input_ids"], dict(inputs))
    ids, sizes = rewritten["input_ids"], rewritten[BIAS].exp()
    kept = 40 if settings == {"visual_ratio": 0} else 16
    assert (ids == IMAGE).sum(1).tolist() == [2 * kept, kept]
    assert torch.allclose(sizes[ids == IMAGE].reshape(-1, kept).sum(1), torch.full((3,), float(PATCHES)))
    assert torch.equal(sizes[ids != IMAGE], torch.ones_like(sizes[ids != IMAGE]))


def test_a_row_does_not_depend_on_its_batch():
    model = tome.patch(tiny_llava(), visual_tokens=16, vision_r=8)
    batch = _batch([ONE, TWO], 3)  # left-padded; image 0 is ONE's, images 1-2 TWO's
    together = _generate(model, batch).logits[0]
    for row, (prompt, images) in enumerate(((ONE, slice(0, 1)), (TWO, slice(1, 3)))):
        alone = _batch([prompt], 1)
        alone["pixel_values"] = batch["pixel_values"][images]
        torch.testing.assert_close(together[row], _generate(model, alone).logits[0][0], atol=1e-4, rtol=0)


def test_beam_search_and_no_cache_run_on_the_shortened_prompt():
    model = tome.patch(tiny_llava(), visual_tokens=16, vision_r=8)
    inputs = _batch([ONE], 1)
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    assert beams.shape == (1, len(ONE) + 3) and torch.equal(beams[0, : len(ONE)], inputs["input_ids"][0])
    cached = _generate(model, inputs).sequences
    assert torch.equal(_generate(model, inputs, use_cache=False).sequences, cached)


def test_a_direct_forward_is_shortened_too():
    model = tome.patch(tiny_llava(), visual_tokens=16, vision_r=8)
    inputs = _batch([ONE], 1)
    logits = model(**inputs).logits
    assert logits.shape[1] == len(ONE) - PATCHES + 16


def test_the_full_strategy_keeps_the_class_token_first():
    model = tome.patch(tiny_llava(), visual_tokens=16, vision_r=8)
    prompt = [1, 5] + [IMAGE] * (PATCHES + 1) + [7]
    inputs = _batch([prompt], 1)
    rewritten, width = _reduced(
        model, model.tome, inputs["input_ids"], {**inputs, "vision_feature_select_strategy": "full"}
    )
    assert width == len(prompt) - (PATCHES + 1) + 16
    sizes = rewritten[BIAS].exp()[rewritten["input_ids"] == IMAGE]
    assert sizes[0].item() == 1.0 and sizes.sum().item() == pytest.approx(PATCHES + 1)


def test_unpatch_deepcopy_and_pickle():
    model = tiny_llava()
    inputs = _batch([ONE], 1)
    check_copies_and_unpatch(model, lambda m: _generate(m, inputs), visual_tokens=16, vision_r=8)
    tower = model.model.vision_tower
    assert all("forward" not in m.__dict__ for m in tower.modules())
    hooks = [h for m in tower.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert all(getattr(h, "__name__", "") == "output_capturing_hook" for h in hooks)  # transformers' own


def test_patching_again_without_vision_r_unpatches_the_tower():
    model = tiny_llava()
    inputs = _batch([ONE], 1)
    reference = _generate(tome.patch(model, visual_tokens=16), inputs)
    tome.patch(model, visual_tokens=16, vision_r=8)
    out = _generate(tome.patch(model, visual_tokens=16), inputs)
    assert model.tome.tower() is None
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))


# -- errors ----------------------------------------------------------------------------------------


def test_vision_r_is_an_option_of_llava_only():
    with pytest.raises(TypeError, match=r"vision_r: an option of .*Llava"):
        tome.patch(tiny_qwen(), visual_tokens=4, vision_r=8)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-1, ValueError),
        ("8", TypeError),
        ((8, 2.0), ValueError),
        ([1, 1, 1, 1, 1], ValueError),
        (True, TypeError),
    ],
)
def test_a_bad_schedule_names_vision_r(value, error):
    model = tiny_llava()
    with pytest.raises(error, match="vision_r"):
        tome.patch(model, visual_tokens=16, vision_r=value)
    assert "tome" not in model.__dict__
    assert all("forward" not in m.__dict__ for m in model.model.vision_tower.modules())
    tome.patch(model, visual_tokens=16, vision_r=8)
    with pytest.raises(error, match="vision_r"):
        model.tome.vision_r = value
    assert model.tome.vision_r == 8


def test_refused_combinations_name_the_options():
    model = tiny_llava()
    with pytest.raises(ValueError, match="vision_r and visual_dominant"):
        tome.patch(model, visual_tokens=16, vision_r=8, visual_dominant=8)
    tome.patch(model, visual_tokens=16)
    with pytest.raises(ValueError, match=r"vision_r: this model was patched with vision_r=None"):
        model.tome.vision_r = 8
    assert model.tome.vision_r is None
    tome.patch(model, visual_tokens=16, vision_r=8)
    with pytest.raises(ValueError, match="vision_r and visual_dominant"):
        model.tome.visual_dominant = 4
    assert model.tome.visual_dominant is None
    inputs = _batch([ONE], 1)
    with pytest.raises(NotImplementedError, match="vision_r"):
        model(**inputs, vision_feature_layer=[-2, -1])
