"""``visual_dominant`` (LLaVA): the dominant tokens kept whole are VisionZip's dominant tokens.

VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in Vision
Language Models") keeps two kinds of visual tokens. Its definition, as the paper gives it, is
written out below (:func:`visionzip`, our own code, the tests' reference):

- dominant: the ``d`` image tokens with the largest attention from the class token, at the
  vision tower's layer whose output the model reads (LLaVA-1.5: the penultimate), the
  attention averaged over heads (a tower without a class token: the mean attention each token
  receives from all tokens);
- contextual: of the remaining image tokens, ``c`` targets sampled uniformly (every
  ``R // c``-th), every other remaining token merged into its most similar target by the
  cosine similarity of that layer's keys (averaged over heads), each contextual token the
  average of its target and the tokens merged into it.

tome's ``visual_dominant`` takes the dominant set exactly (tested here on the same inputs,
class token or not, ``"default"`` or ``"full"``); its other kept tokens are tome's own merge
(bipartite soft matching on the projected features, size-weighted means, in raster order),
not VisionZip's contextual tokens: :func:`test_the_contextual_tokens_are_tomes_own` shows the
difference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _vlm import IMAGE, PAD, TEXT, check_copies_and_unpatch, tiny_llava, tiny_qwen

import tome
from tome.adapters.common.dominant import (
    attention_received,
    dominant_count,
    recording_attention,
    reduce_images_dominant,
    sizes_bias,
)

transformers = pytest.importorskip("transformers")

PATCHES = 64  # (32 px / 4 px) ** 2


def tiny_siglip_llava(seed: int = 0) -> torch.nn.Module:
    """A LLaVA whose vision tower has no class token (SigLIP), features read whole ("full")."""
    torch.manual_seed(seed)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=4,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=transformers.LlamaConfig(**TEXT), image_token_id=IMAGE,
        vision_feature_select_strategy="full",
    )  # fmt: skip
    return transformers.LlavaForConditionalGeneration(config).eval()


# -- the reference: VisionZip, from the paper's definition --------------------------------------


@torch.no_grad()
def visionzip(model, pixels: torch.Tensor, dominant: int, contextual: int) -> dict:
    """VisionZip's selection on a transformers LLaVA, from the paper's definition: the eager
    attention weights of the layer the model reads (``output_attentions``), its keys, its hidden
    states. Returns the dominant indices (over the image tokens the model reads, ascending) and
    VisionZip's tokens, dominant then contextual, through the projector."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    tower = eager.model.vision_tower
    layers = tower.encoder.layers
    out = tower(pixels, output_attentions=True, output_hidden_states=True)
    f = model.config.vision_feature_layer % (len(layers) + 1)
    weights = out.attentions[f - 1]  # (B, H, N, N): the layer that produced hidden_states[f]
    hidden = out.hidden_states[f]
    has_cls = hasattr(tower.embeddings, "class_embedding")
    if has_cls:
        score = weights[:, :, 0, 1:].mean(1)  # the class token's row, over the image tokens
        tokens = hidden[:, 1:]
    else:
        score = weights.mean(1).mean(1)  # mean attention received
        tokens = hidden
    if not has_cls:  # the first token: dropped by the model ("default") or kept whole by tome ("full")
        score, tokens = score[:, 1:], tokens[:, 1:]
    B, n, _ = tokens.shape
    chosen = score.topk(dominant, dim=1).indices.sort(dim=1).values
    # the layer's keys, averaged over heads, of the remaining tokens
    layer = layers[f - 1]
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[f - 1]))
    keys = keys.reshape(B, keys.shape[1], layer.self_attn.num_heads, -1).mean(2)
    keys = keys[:, keys.shape[1] - n :]
    contextual_tokens = [tokens.new_zeros(0, tokens.shape[2])] * B if contextual == 0 else []
    for b in range(B if contextual else 0):
        rest = torch.ones(n, dtype=torch.bool)
        rest[chosen[b]] = False
        r_tokens, r_keys = tokens[b, rest], torch.nn.functional.normalize(keys[b, rest], dim=-1)
        R = r_tokens.shape[0]
        targets = torch.arange(0, R, max(1, R // contextual))[:contextual]
        others = torch.ones(R, dtype=torch.bool)
        others[targets] = False
        nearest = (r_keys[others] @ r_keys[targets].T).argmax(1)
        total = r_tokens[targets].clone().index_add_(0, nearest, r_tokens[others])
        count = torch.ones(len(targets)).index_add_(0, nearest, torch.ones(int(others.sum())))
        contextual_tokens.append(total / count[:, None])
    kept = torch.cat([tokens.gather(1, chosen[..., None].expand(-1, -1, tokens.shape[2])), torch.stack(contextual_tokens)], 1)  # fmt: skip
    return {"dominant": chosen, "tokens": model.model.multi_modal_projector(kept)}


def _inputs(images: int, seed: int = 1) -> dict:
    """``images`` rows of one prompt each, one image each (no padding: every row alike)."""
    ids = torch.tensor([[1, 5] + [IMAGE] * PATCHES + [7, 8]] * images)
    pixels = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def _visual_inputs(model, inputs: dict) -> torch.Tensor:
    """The visual rows of the embeddings the language model reads in one forward ``(B, k, D)``."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"]), with_kwargs=True
    )
    try:
        model(**inputs)
    finally:
        hook.remove()
    return seen[0][:, 2:-2]


# -- the dominant set is VisionZip's ------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("build", [tiny_llava, tiny_siglip_llava])
def test_the_scores_rank_as_visionzips(seed, build):
    model = build(seed)
    inputs = _inputs(4, seed)
    reference = visionzip(model, inputs["pixel_values"], dominant=10, contextual=6)
    tower = model.model.vision_tower
    has_cls = build is tiny_llava
    attention = tower.encoder.layers[model.config.vision_feature_layer % 3 - 1].self_attn
    with recording_attention(attention, has_cls) as seen:
        model.get_image_features(pixel_values=inputs["pixel_values"])
    assert not attention._forward_pre_hooks  # nothing left installed
    scores = seen[0][:, 0 if has_cls else 1 :]
    assert torch.equal(scores.topk(10, dim=1).indices.sort(dim=1).values, reference["dominant"])


@torch.no_grad()
@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("build", [tiny_llava, tiny_siglip_llava])
def test_the_tokens_kept_whole_are_visionzips_dominant_tokens(strategy, build):
    model = build(3)
    model.config.vision_feature_select_strategy = strategy
    protected = int(strategy == "full")
    inputs = _inputs(3, seed=4)
    n = PATCHES + int(build is tiny_llava) - int(strategy == "default")  # the features per image
    inputs["input_ids"] = torch.tensor([[1, 5] + [IMAGE] * n + [7, 8]] * 3)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    features = torch.stack(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
    reference = visionzip(model, inputs["pixel_values"], dominant=10, contextual=6)
    tome.patch(model, visual_tokens=16 + protected, visual_dominant=10, visual_prop_attn=False)
    read = _visual_inputs(model, inputs)  # (3, 16 + protected, D)
    assert read.shape[1] == 16 + protected
    for b in range(3):
        if protected:
            assert torch.equal(read[b, 0], features[b, 0])  # the first token stays first
        # the rows the language model reads that are original tokens, whole: VisionZip's dominant
        # set (and any token the merge left alone, a contextual token of size 1)
        whole = {
            i - protected
            for i in range(n)
            if i >= protected and any(torch.equal(features[b, i], row) for row in read[b, protected:])
        }
        assert set(reference["dominant"][b].tolist()) <= whole
        # ... VisionZip's dominant tokens, projected (its eager tower: to float precision)
        dominant = features[b, protected + reference["dominant"][b]]
        torch.testing.assert_close(dominant, reference["tokens"][b, :10], rtol=1e-4, atol=1e-5)
    # every kept token dominant (VisionZip without contextual tokens): exactly its 16, in order
    reference = visionzip(model, inputs["pixel_values"], dominant=16, contextual=0)
    model.tome.visual_dominant = 16
    read = _visual_inputs(model, inputs)
    for b in range(3):
        assert torch.equal(read[b, protected:], features[b, protected + reference["dominant"][b]])


@torch.no_grad()
def test_the_contextual_tokens_are_tomes_own():
    # VisionZip: 6 targets every R // 6-th remaining token, the others assigned by key cosine, one
    # step, before the projector; tome: the remaining projected features matched pairwise,
    # halving, size-weighted means after the projector. Same dominant tokens, other contextual ones.
    model = tiny_llava(5)
    inputs = _inputs(2, seed=6)
    reference = visionzip(model, inputs["pixel_values"], dominant=10, contextual=6)
    tome.patch(model, visual_tokens=16, visual_dominant=10, visual_prop_attn=False)
    read = _visual_inputs(model, inputs)
    for b in range(2):
        ours = [
            row
            for row in read[b]
            if not any(torch.allclose(row, d, atol=1e-5) for d in reference["tokens"][b, :10])
        ]
        assert len(ours) == 6
        theirs = reference["tokens"][b, 10:]
        assert not any(torch.allclose(row, t, atol=1e-5) for row in ours for t in theirs)


# -- the pure pieces -------------------------------------------------------------------------------


def test_attention_received_is_the_layers_softmax():
    torch.manual_seed(0)
    q, k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    hidden = torch.randn(2, 5, 8)
    queries = q(hidden).reshape(2, 5, 2, 4).transpose(1, 2)
    keys = k(hidden).reshape(2, 5, 2, 4).transpose(1, 2)
    weights = torch.softmax(queries @ keys.transpose(-1, -2) * 0.5, -1)  # (B, H, N, N)
    torch.testing.assert_close(attention_received(hidden, q, k, 2, 0.5, True), weights[:, :, 0, 1:].mean(1))
    torch.testing.assert_close(attention_received(hidden, q, k, 2, 0.5, False), weights.mean((1, 2)))


def test_dominant_count():
    assert [dominant_count(d, 64) for d in (None, 0, 10, 64, 100, 0.84375, 1.0, 0.0)] == [
        0,
        0,
        10,
        64,
        64,
        54,
        64,
        0,
    ]
    assert [dominant_count(0.84375, k) for k in (128, 192, 144)] == [
        108,
        162,
        121,
    ]  # VisionZip's splits; floor


@pytest.mark.parametrize("protected", [0, 1])
def test_the_kept_tokens_are_dominant_tokens_and_size_weighted_means(protected):
    torch.manual_seed(0)
    features = [torch.randn(20, 6), torch.randn(20, 6), torch.randn(12, 6)]
    scores = [torch.rand(f.shape[0] - protected) for f in features]
    merged, sources, sizes = reduce_images_dominant(features, scores, 8, None, 5, protected)
    for x, s, score, out, size in zip(features, sources, scores, merged, sizes, strict=True):
        assert out.shape == (8, 6) and size.sum() == x.shape[0]
        assert torch.equal(torch.bincount(s, minlength=8).float(), size)
        for j in range(8):  # every kept token: the mean of the tokens it holds
            torch.testing.assert_close(out[j], x[s == j].mean(0))
        dominant = (score.topk(5).indices + protected).sort().values
        assert torch.equal(size[s[dominant]], torch.ones(5))  # kept whole
        assert torch.equal(out[s[dominant]], x[dominant])
        assert s[dominant].unique().numel() == 5
        if protected:
            assert s[0] == 0 and size[0] == 1
        # kept tokens in the order of their mean place
        place = torch.zeros(8).index_add_(0, s, torch.arange(x.shape[0]).float()) / size
        assert bool((place[1:] >= place[:-1]).all())


def test_every_kept_token_dominant_drops_the_rest():
    x = torch.randn(10, 4)
    merged, sources, sizes = reduce_images_dominant([x], [torch.arange(10.0)], 3, None, 3)
    assert torch.equal(merged[0], x[7:]) and torch.equal(sizes[0], torch.ones(3))
    assert sources[0].tolist() == [-1] * 7 + [0, 1, 2]
    ids = torch.tensor([[5] + [IMAGE] * 10 + [6]])
    assert torch.equal(sizes_bias(ids, IMAGE, sizes, [10]), torch.zeros(1, 12))


def test_zero_dominant_is_the_plain_merge():
    from tome.adapters.common.vlm import reduce_images_tracked

    x = [torch.randn(16, 4)]
    plain, sources = reduce_images_tracked(x, 5, None)
    merged, ours, sizes = reduce_images_dominant(x, [torch.rand(16)], 5, None, 0)
    assert torch.equal(merged[0], plain[0]) and torch.equal(ours[0], sources[0])
    assert torch.equal(sizes[0], torch.bincount(sources[0]).float())


def test_bad_scores_are_clear_errors():
    with pytest.raises(ValueError, match=r"scores: expected \(15,\) for image 0"):
        reduce_images_dominant([torch.randn(16, 4)], [torch.rand(16)], 5, None, 2, protected=1)
    with pytest.raises(ValueError, match="scores: expected one per image"):
        reduce_images_dominant([torch.randn(16, 4)], [], 5, None, 2)


# -- the option on the model -----------------------------------------------------------------------


def _generate(model, inputs: dict, **kwargs):
    return model.generate(
        **inputs,
        max_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


def _padded(prompts: list[list[int]], images: int, seed: int = 1) -> dict:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    pixels = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


ONE = [1, 5, 6] + [IMAGE] * PATCHES + [7, 8]
TWO = [1, 11] + [IMAGE] * (2 * PATCHES) + [12]


@torch.no_grad()
def test_generate_shortens_the_prompt_and_leaves_nothing_installed():
    model = tome.patch(tiny_llava(), visual_tokens=12, visual_dominant=9)
    inputs = _padded([ONE, TWO], images=3)
    out = _generate(model, inputs)
    width = inputs["input_ids"].shape[1]
    assert out.cache.get_seq_length() == width - 2 * (PATCHES - 12) + 3
    assert torch.equal(out.sequences[:, :width], inputs["input_ids"])
    for layer in model.model.vision_tower.encoder.layers:
        assert not layer.self_attn._forward_pre_hooks
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    assert beams.shape == (2, width + 3)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False), out.sequences[:, :-1])  # fmt: skip


@torch.no_grad()
def test_each_row_of_a_padded_batch_is_its_own_run():
    model = tome.patch(tiny_llava(), visual_ratio=0.75, visual_dominant=0.75)
    short = [1, 5] + [IMAGE] * PATCHES + [7]
    inputs = _padded([short, TWO, ONE], images=4, seed=3)
    together = _generate(model, inputs)
    pixels = inputs["pixel_values"]
    for row, (prompt, images) in enumerate([(short, pixels[:1]), (TWO, pixels[1:3]), (ONE, pixels[3:])]):
        alone = _generate(model, {**_padded([prompt], 0), "pixel_values": images})
        torch.testing.assert_close(together.logits[0][row], alone.logits[0][0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_no_merging_is_exact_with_dominant_tokens():
    model = tiny_llava()
    inputs = _padded([ONE, TWO], images=3)
    reference = model(**inputs).logits
    tome.patch(model, visual_tokens=PATCHES, visual_dominant=10)
    assert torch.equal(model(**inputs).logits, reference)


@torch.no_grad()
def test_proportional_attention_weighs_the_merged_tokens_not_the_dominant_ones():
    model = tiny_llava()
    inputs = _inputs(1, seed=2)
    attention = model.model.vision_tower.encoder.layers[0].self_attn
    with recording_attention(attention, True) as seen:
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    _, _, sizes = reduce_images_dominant(list(features), [seen[0][0]], 16, None, 10)
    tome.patch(model, visual_tokens=16, visual_dominant=10)
    masks = []
    hook = model.model.language_model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, k: masks.append(k["attention_mask"]), with_kwargs=True
    )
    try:
        model(**inputs)
    finally:
        hook.remove()
    last = masks[0][0, 0, -1]  # the last query sees every key: its row is the bias
    assert torch.equal(last[2:18], sizes[0].log())
    assert int((last[2:18] == 0).sum()) >= 10 and round(float(last[2:18].exp().sum())) == PATCHES


@torch.no_grad()
def test_unpatch_copies_and_pickles():
    model = tiny_llava()
    inputs = _padded([ONE, TWO], images=3)
    run = lambda m: _generate(m, inputs)  # noqa: E731
    check_copies_and_unpatch(model, run, visual_tokens=8, visual_dominant=6)


def test_the_option_and_its_errors():
    model = tome.patch(tiny_llava(), visual_tokens=64, visual_dominant=54)
    assert model.tome.patch_options()["visual_dominant"] == 54
    assert "visual_dominant=54" in repr(model.tome)
    with pytest.raises(
        ValueError, match=r"visual_dominant and visual_tokens: .*visual_dominant=54, visual_tokens=32"
    ):
        model.tome.visual_tokens = 32
    assert (model.tome.visual_tokens, model.tome.visual_dominant) == (64, 54)  # unchanged
    with pytest.raises(ValueError, match=r"visual_dominant=65, visual_tokens=64"):
        model.tome.visual_dominant = 65
    assert model.tome.visual_dominant == 54
    model.tome.visual_ratio = 0.9  # an int is capped at each image's kept tokens then
    assert (model.tome.visual_tokens, model.tome.visual_dominant) == (None, 54)
    model.tome.visual_tokens = 100  # then set back: 54 <= 100
    for bad in (-1, 1.5, -0.1, True, "54"):
        with pytest.raises(ValueError, match="visual_dominant: expected an int >= 0"):
            model.tome.visual_dominant = bad
    with pytest.raises(ValueError, match=r"visual_dominant and visual_tokens"):
        tome.patch(model, visual_tokens=8, visual_dominant=9)
    assert model.tome.visual_tokens == 100  # the earlier patch is back
    assert tome.patch(tiny_llava()).tome.visual_dominant is None  # off by default
    with pytest.raises(TypeError, match=r"visual_dominant: an option of vision-language models \(transformers LlavaForConditionalGeneration\)"):  # fmt: skip
        tome.patch(tiny_qwen(), visual_dominant=8)
