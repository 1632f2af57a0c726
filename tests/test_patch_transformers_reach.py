"""tome.patch on more transformers vision families: SigLIP / SigLIP2 (NaFlex padding, attention
pooling), the CLIP two-tower model, VideoMAE (video), AST (audio), ViT-MAE and DINOv2 backbones
(feature maps of several stages).

Every class runs on a tiny random config (no downloads): r=0 equals the unpatched model, merging
happens as scheduled, unpatch is bit-identical, copies and pickles keep merging, torch.export
gives the eager result."""

from __future__ import annotations

import copy
import io
import pickle
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import tome
from tome.core.merge import max_r

transformers = pytest.importorskip("transformers")

LAYERS, HIDDEN = 3, 32
_H = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64)
_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
             bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
IMG, PATCH = 24, 4  # 36 patches
GRID = IMG // PATCH
NAFLEX = 36  # SigLIP2: patches per row of a batch (6 x 6 when not padded)
FRAMES, TUBELET, VPATCH = 4, 2, 6  # VideoMAE: 2 x 4 x 4 = 32 tubelets
MELS, AUDIO_LEN = 24, 48  # AST: 5 x 11 = 55 patches + 2


def _siglip2_vision(**overrides) -> dict:
    return {**_H, "patch_size": PATCH, "num_patches": 16, **overrides}


def _dino(**overrides) -> dict:
    return dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, mlp_ratio=2,
                image_size=IMG, patch_size=PATCH, **overrides)  # fmt: skip


def _config(name: str, **overrides):
    t = transformers
    vision = {**_H, "image_size": IMG, "patch_size": PATCH, **overrides}
    if name == "SiglipVisionModel":
        return t.SiglipVisionConfig(**vision)
    if name in ("SiglipModel", "SiglipForImageClassification"):
        return t.SiglipConfig(
            vision_config=vision, text_config={**_TEXT, "projection_size": HIDDEN}, num_labels=5
        )
    if name == "Siglip2VisionModel":
        return t.Siglip2VisionConfig(**_siglip2_vision(**overrides))
    if name in ("Siglip2Model", "Siglip2ForImageClassification"):
        text = {**_TEXT, "projection_size": HIDDEN}
        return t.Siglip2Config(vision_config=_siglip2_vision(**overrides), text_config=text, num_labels=5)
    if name == "CLIPModel":
        return t.CLIPConfig(vision_config=vision, text_config=_TEXT, projection_dim=16)
    if name.startswith("VideoMAE"):
        video = dict(image_size=IMG, patch_size=VPATCH, num_frames=FRAMES, tubelet_size=TUBELET, num_labels=5)
        return t.VideoMAEConfig(**{**_H, **video, **overrides})
    if name.startswith("AST"):
        audio = dict(num_mel_bins=MELS, max_length=AUDIO_LEN, patch_size=8, frequency_stride=4, time_stride=4)
        return t.ASTConfig(**{**_H, **audio, "num_labels": 5, **overrides})
    if name == "ViTMAEModel":
        return t.ViTMAEConfig(**{"mask_ratio": 0.0, **vision})
    stages = {"out_features": ["stage1", "stage2", "stage3"], **overrides}
    if name == "Dinov2Backbone":
        return t.Dinov2Config(**_dino(**stages))
    if name == "Dinov2WithRegistersBackbone":
        return t.Dinov2WithRegistersConfig(**_dino(num_register_tokens=2, **stages))
    raise KeyError(name)


# -- inputs and calls, per kind -------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image_inputs(batch: int, seed: int) -> dict:
    return {"pixel_values": torch.randn(batch, 3, IMG, IMG, generator=_gen(seed))}


def _naflex_inputs(batch: int, seed: int) -> dict:
    return {
        "pixel_values": torch.randn(batch, NAFLEX, 3 * PATCH * PATCH, generator=_gen(seed)),
        "pixel_attention_mask": torch.ones(batch, NAFLEX, dtype=torch.long),
        "spatial_shapes": torch.tensor([[GRID, GRID]] * batch),
    }


def _video_inputs(batch: int, seed: int) -> dict:
    return {"pixel_values": torch.randn(batch, FRAMES, 3, IMG, IMG, generator=_gen(seed))}


def _audio_inputs(batch: int, seed: int) -> dict:
    return {"input_values": torch.randn(batch, AUDIO_LEN, MELS, generator=_gen(seed))}


def _mae_inputs(batch: int, seed: int) -> dict:
    # ViT-MAE shuffles its patches by `noise` (random unless given): fixed for comparisons.
    return {**_image_inputs(batch, seed), "noise": torch.rand(batch, GRID * GRID, generator=_gen(seed + 100))}


def _call(model, x: dict) -> dict[str, torch.Tensor]:
    return _tensors(model(**x))


def _image_features(model, x: dict) -> dict[str, torch.Tensor]:
    return _tensors(model.get_image_features(**x))


def _feature_maps(model, x: dict) -> dict[str, torch.Tensor]:
    return {f"map{i}": m for i, m in enumerate(model(**x).feature_maps)}


def _tensors(out) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@dataclass(frozen=True)
class Spec:
    inputs: Callable[[int, int], dict]
    tokens: int  # tokens entering block 0
    protected: int
    call: Callable = _call
    main: str = "last_hidden_state"  # the output exported and compared
    sequence: bool = True  # the output has last_hidden_state at the merged length


_SIGLIP = dict(inputs=_image_inputs, tokens=GRID * GRID, protected=0)
_SIGLIP2 = dict(inputs=_naflex_inputs, tokens=NAFLEX, protected=0)
SPECS = {
    "SiglipVisionModel": Spec(**_SIGLIP),
    "SiglipModel": Spec(**_SIGLIP, call=_image_features, main="pooler_output"),
    "SiglipForImageClassification": Spec(**_SIGLIP, main="logits", sequence=False),
    "Siglip2VisionModel": Spec(**_SIGLIP2),
    "Siglip2Model": Spec(**_SIGLIP2, call=_image_features, main="pooler_output"),
    "Siglip2ForImageClassification": Spec(**_SIGLIP2, main="logits", sequence=False),
    "CLIPModel": Spec(_image_inputs, GRID * GRID + 1, 1, call=_image_features, main="pooler_output"),
    "VideoMAEModel": Spec(_video_inputs, 32, 0),
    "VideoMAEForVideoClassification": Spec(_video_inputs, 32, 0, main="logits", sequence=False),
    "ASTModel": Spec(_audio_inputs, 57, 2),
    "ASTForAudioClassification": Spec(_audio_inputs, 57, 2, main="logits", sequence=False),
    "ViTMAEModel": Spec(_mae_inputs, GRID * GRID + 1, 1),
    "Dinov2Backbone": Spec(
        _image_inputs, GRID * GRID + 1, 1, call=_feature_maps, main="map1", sequence=False
    ),
    "Dinov2WithRegistersBackbone": Spec(
        _image_inputs, GRID * GRID + 3, 3, call=_feature_maps, main="map1", sequence=False
    ),
}
CLASSES = list(SPECS)
BACKBONES = ["Dinov2Backbone", "Dinov2WithRegistersBackbone"]


def make(name: str, attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, name)(_config(name, **overrides))
    model.set_attn_implementation(attn)
    return model.eval()


def inputs(name: str, batch: int = 2, seed: int = 1) -> dict:
    return SPECS[name].inputs(batch, seed)


def run(name: str, model, x: dict) -> dict[str, torch.Tensor]:
    return SPECS[name].call(model, x)


def expected_counts(n: int, r: int, protected: int, layers: int = LAYERS) -> list[int]:
    counts = [n]
    for _ in range(layers):
        counts.append(counts[-1] - min(r, max_r(counts[-1], protected)))
    return counts


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def _installed(model: torch.nn.Module) -> list[tuple]:
    """Per module: forwards replaced on the instance, hook ids (transformers installs its own
    output-capturing hooks, which stay)."""
    return [
        (
            name,
            sorted(k for k in ("forward", "__prepare_scriptable__") if k in m.__dict__),
            sorted(m._forward_hooks),
            sorted(m._forward_pre_hooks),
        )
        for name, m in model.named_modules()
    ]


# -- equivalence and bookkeeping ---------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_r0_matches_unpatched(name, attn):
    model, x = make(name, attn), inputs(name)
    with torch.no_grad():
        ref = run(name, model, x)
        for unmerge_output in (True, False):
            tome.patch(model, r=0, unmerge_output=unmerge_output)
            assert_close(run(name, model, x), ref)
    assert model.tome.tokens_per_layer == [SPECS[name].tokens] * (LAYERS + 1)


@pytest.mark.parametrize("name", CLASSES)
def test_tokens_merge_as_scheduled(name):
    spec = SPECS[name]
    model = tome.patch(make(name), r=5)
    assert model.tome.family == "transformers" and model.tome.protected == spec.protected
    with torch.no_grad():
        out = run(name, model, inputs(name))
    counts = expected_counts(spec.tokens, 5, spec.protected)
    assert model.tome.tokens_per_layer == counts and counts[-1] < counts[0]
    if spec.sequence:
        assert out["last_hidden_state"].shape == (2, counts[-1], HIDDEN)
    p = spec.protected
    assert torch.equal(model.tome.source[:, :p], torch.arange(p).expand(2, p))
    assert torch.all(model.tome.sizes.sum(1) == spec.tokens)
    with torch.no_grad():
        model.tome.unmerge_output = True
        full = run(name, model, inputs(name))
    if spec.sequence:
        assert full["last_hidden_state"].shape == (2, spec.tokens, HIDDEN)


@pytest.mark.parametrize("name", CLASSES)
def test_unpatch_is_bit_identical(name):
    model, x = make(name), inputs(name)
    with torch.no_grad():
        run(name, model, x)  # transformers may install its own hooks on a first call
    installed, state = _installed(model), {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = run(name, model, x)
        tome.patch(model, r=4, unmerge_output=True)
        merged = run(name, model, x)
        assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in ref.items()}
        assert list(model.state_dict()) == list(state)
        tome.unpatch(model)
        after = run(name, model, x)
    assert "tome" not in model.__dict__ and _installed(model) == installed
    assert all(torch.equal(after[k], ref[k]) for k in ref)
    new_state = model.state_dict()
    assert list(new_state) == list(state) and all(torch.equal(new_state[k], state[k]) for k in state)


@pytest.mark.parametrize("name", CLASSES)
def test_eager_and_sdpa_agree_while_merging(name):
    x, results = inputs(name), []
    for attn in ("eager", "sdpa"):
        model = tome.patch(make(name, attn), r=6, unmerge_output=True)
        with torch.no_grad():
            results.append((run(name, model, x), model.tome.source))
    (a, source_a), (b, source_b) = results
    assert torch.equal(source_a, source_b)
    assert_close(a, b)


@pytest.mark.parametrize("name", ["SiglipVisionModel", "VideoMAEModel", "ASTModel", "ViTMAEModel"])
def test_prop_attn_changes_merged_layers(name):
    x = inputs(name)
    model = tome.patch(make(name), r=6, prop_attn=True)
    with torch.no_grad():
        with_prop = run(name, model, x)["last_hidden_state"]
        model.tome.prop_attn = False
        without = run(name, model, x)["last_hidden_state"]
    assert with_prop.shape == without.shape and not torch.allclose(with_prop, without, atol=1e-4)


@pytest.mark.parametrize("name", CLASSES)
def test_backward_reaches_the_embeddings(name):
    model = make(name).train()
    tome.patch(model, r=6, unmerge_output=True)
    loss = sum(v.float().pow(2).mean() for v in run(name, model, inputs(name)).values())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any("embed" in n or "patch" in n for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("name", ["SiglipVisionModel", "VideoMAEModel", "ASTModel", "Dinov2Backbone"])
def test_gradient_checkpointing_is_exact(name):
    x, grads, counts = inputs(name), [], []
    for checkpointing in (False, True):
        model = make(name).train()  # dropout probabilities are 0: both runs are deterministic
        if checkpointing:
            model.gradient_checkpointing_enable()
        tome.patch(model, r=6, unmerge_output=True)
        calls = []
        key = next(
            m
            for n, m in model.named_modules()
            if n.endswith(("0.self_attn.k_proj", "0.attention.k_proj", "0.attention.attention.key"))
        )
        key.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        sum(v.pow(2).mean() for v in run(name, model, x).values()).backward()
        assert len(calls) == (2 if checkpointing else 1)  # the layer really was recomputed
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        counts.append(model.tome.tokens_per_layer)
    assert counts[0] == counts[1] == expected_counts(SPECS[name].tokens, 6, SPECS[name].protected)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5, msg=k)


# -- copies, pickles, export ---------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSES)
def test_deepcopy_is_an_independent_patched_model(name):
    model, x = tome.patch(make(name), r=5), inputs(name)
    with torch.no_grad():
        merged = run(name, model, x)
        twin = copy.deepcopy(model)
        assert_close(run(name, twin, x), merged, atol=0)
        twin.tome.r = 0
        assert model.tome.r == 5
        run(name, twin, x)
        assert twin.tome.tokens_per_layer == [SPECS[name].tokens] * (LAYERS + 1)
        tome.unpatch(twin)
        assert_close(run(name, model, x), merged, atol=0)  # the original still merges
    assert model.tome.tokens_per_layer[-1] < SPECS[name].tokens


def _picklable(model: torch.nn.Module) -> bool:
    try:
        pickle.dumps(model)
    except (AttributeError, pickle.PicklingError, TypeError):
        return False
    return True


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_save_and_load_round_trip(name, how):
    model, x = make(name), inputs(name)
    if not _picklable(model):
        # transformers 5's *Backbone models hold local-function output-capturing hooks from
        # their construction: they do not pickle unpatched either.
        pytest.skip(f"an unpatched {name} does not pickle in this transformers version")
    tome.patch(model, r=5)
    with torch.no_grad():
        merged = run(name, model, x)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert_close(run(name, loaded, x), merged, atol=0)
        assert loaded.tome.tokens_per_layer == model.tome.tokens_per_layer
        tome.unpatch(loaded)
        tome.unpatch(model)
        assert_close(run(name, loaded, x), run(name, model, x), atol=0)


class Exported(torch.nn.Module):
    """A patched model as a ``tensors -> tensor`` module (its spec's main output)."""

    def __init__(self, name: str, model: torch.nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.name, self.model, self.keys = name, model, keys

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return run(self.name, self.model, dict(zip(self.keys, tensors, strict=True)))[SPECS[self.name].main]


@pytest.mark.parametrize("name", CLASSES)
def test_torch_export(name):
    model, x = tome.patch(make(name), r=4), inputs(name)
    view = Exported(name, model, list(x))
    with torch.no_grad():
        ref = view(*x.values())
        exported = torch.export.export(view, tuple(x.values()))
        torch.testing.assert_close(exported.module()(*x.values()), ref, atol=1e-5, rtol=1e-5)
    assert model.tome.tokens_per_layer[-1] < SPECS[name].tokens


# -- SigLIP: the attention-pooling head -----------------------------------------------------------


@pytest.mark.parametrize("name", ["SiglipVisionModel", "Siglip2VisionModel"])
def test_attention_pooling_head_sees_size_weighted_tokens(name):
    """The head attends over every original token once: over the merged tokens that is
    attention with log(size) added to each key's logit (proportional attention)."""
    model, x = make(name), inputs(name)
    tome.patch(model, r=7, unmerge_output=False, unmerge_detail=False)
    with torch.no_grad():
        out = model(**x)
        merged = out.last_hidden_state
        assert merged.shape[1] == model.tome.tokens_per_layer[-1] < SPECS[name].tokens
        sizes = model.tome.sizes
        head = model.head
        probe = head.probe.expand(len(merged), -1, -1)
        heads = head.attention.num_heads
        bias = sizes.log()[:, None, :].repeat_interleave(heads, dim=0)  # (B * heads, 1, N)
        pooled = head.attention(probe, merged, merged, attn_mask=bias, need_weights=False)[0]
        expected = (pooled + head.mlp(head.layernorm(pooled)))[:, 0]
        torch.testing.assert_close(out.pooler_output, expected, atol=1e-5, rtol=1e-5)
        # and the same pooled output whether the sequence output comes back merged or not
        model.tome.unmerge_output = True
        full = model(**x)
    assert full.last_hidden_state.shape[1] == SPECS[name].tokens
    torch.testing.assert_close(full.pooler_output, out.pooler_output, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["SiglipForImageClassification", "Siglip2ForImageClassification"])
def test_siglip_classifier_mean_is_size_weighted(name):
    model, x = make(name), inputs(name)
    tome.patch(model, r=7, unmerge_output=False)
    seen = []
    model.vision_model.register_forward_hook(lambda m, a, o: seen.append(o.last_hidden_state))
    with torch.no_grad():
        logits = model(**x).logits
    (sequence,) = seen
    assert sequence.shape[1] == SPECS[name].tokens  # the mean reads every original token once
    assert model.tome.tokens_per_layer[-1] < SPECS[name].tokens
    torch.testing.assert_close(logits, model.classifier(sequence.mean(1)), atol=1e-5, rtol=1e-5)


# -- SigLIP2: NaFlex batches of images of different sizes ---------------------------------------


def _naflex_batch(shapes: list[tuple[int, int]], length: int, seed: int = 3) -> tuple[dict, list[dict]]:
    """A padded batch of images of the given patch grids, and each image alone (unpadded)."""
    g = _gen(seed)
    rows, alone = [], []
    for h, w in shapes:
        patches = torch.randn(h * w, 3 * PATCH * PATCH, generator=g)
        alone.append(
            {
                "pixel_values": patches[None],
                "pixel_attention_mask": torch.ones(1, h * w, dtype=torch.long),
                "spatial_shapes": torch.tensor([[h, w]]),
            }
        )
        rows.append(patches)
    batch = {
        "pixel_values": torch.zeros(len(shapes), length, 3 * PATCH * PATCH),
        "pixel_attention_mask": torch.zeros(len(shapes), length, dtype=torch.long),
        "spatial_shapes": torch.tensor(shapes),
    }
    for i, patches in enumerate(rows):
        batch["pixel_values"][i, : len(patches)] = patches
        batch["pixel_attention_mask"][i, : len(patches)] = 1
    return batch, alone


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("schedule", [{"r": 5}, {"ratio": 0.3}])
def test_naflex_image_gives_its_own_output_in_a_padded_batch(attn, schedule):
    shapes = [(6, 6), (4, 5), (3, 3)]
    batch, alone = _naflex_batch(shapes, length=40)
    model = make("Siglip2VisionModel", attn)
    with torch.no_grad():
        ref = model(**batch).pooler_output
        tome.patch(model, r=0)
        torch.testing.assert_close(model(**batch).pooler_output, ref, atol=1e-5, rtol=1e-5)
        tome.patch(model, **schedule, unmerge_output=True)
        out = model(**batch)
        sizes = model.tome.sizes
        merged_batch = model.tome.tokens_per_layer
        for i, single in enumerate(alone):
            n = shapes[i][0] * shapes[i][1]
            one = model(**single)
            torch.testing.assert_close(out.pooler_output[i], one.pooler_output[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(
                out.last_hidden_state[i, :n], one.last_hidden_state[0], atol=1e-5, rtol=1e-4
            )
            # padding has size 0: the merged tokens hold this image's n patches, nothing else
            # (masked_soft_matching may fold a size-0 padding token into a real one: no effect)
            assert sizes[i].sum() == n and torch.all(sizes[i][sizes[i] > 0] >= 1)
    assert merged_batch[-1] < merged_batch[0]


def test_naflex_padding_content_changes_nothing():
    batch, _ = _naflex_batch([(6, 6), (4, 5)], length=40)
    model = tome.patch(make("Siglip2VisionModel"), r=6)
    noisy = {**batch, "pixel_values": batch["pixel_values"].clone()}
    noisy["pixel_values"][1, 20:] = torch.randn(20, 3 * PATCH * PATCH)
    with torch.no_grad():
        a, b = model(**batch).pooler_output, model(**noisy).pooler_output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_siglip2_classifier_pools_real_patches_size_weighted():
    batch, alone = _naflex_batch([(6, 6), (4, 5)], length=40)
    model = tome.patch(make("Siglip2ForImageClassification"), r=5)
    with torch.no_grad():
        logits = model(**batch).logits
        for i, single in enumerate(alone):
            torch.testing.assert_close(logits[i], model(**single).logits[0], atol=1e-5, rtol=1e-4)


# -- the CLIP two-tower model: only the image tower merges --------------------------------------


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel", "Siglip2Model"])
def test_two_tower_model_merges_images_and_leaves_text_alone(name):
    spec, model = SPECS[name], make(name)
    ids = torch.randint(2, 64, (2, 7), generator=_gen(5))
    text_before = _installed(model.text_model)
    with torch.no_grad():
        text_ref = model.get_text_features(input_ids=ids).pooler_output
        ref = model(input_ids=ids, **inputs(name))
        tome.patch(model, r=6)
        assert _installed(model.text_model) == text_before  # nothing installed on the text tower
        assert torch.equal(model.get_text_features(input_ids=ids).pooler_output, text_ref)
        out = model(input_ids=ids, **inputs(name))
    assert model.tome.tokens_per_layer == expected_counts(spec.tokens, 6, spec.protected)
    assert torch.equal(out.text_embeds, ref.text_embeds)
    assert not torch.allclose(out.image_embeds, ref.image_embeds, atol=1e-6)
    assert torch.cosine_similarity(out.image_embeds, ref.image_embeds).min() > 0.5


# -- VideoMAE ---------------------------------------------------------------------------------------


def test_videomae_masked_self_attention_equals_the_class_forward():
    """tome's mask-taking forward of VideoMAE's self-attention, with an all-zero mask, is the
    class's own forward (which takes none)."""
    model = tome.patch(make("VideoMAEModel"), r=4)
    attention = model.encoder.layer[0].attention.attention
    hidden = torch.randn(2, 32, HIDDEN)
    with torch.no_grad():
        own = type(attention).forward(attention, hidden)[0]
        masked = attention(hidden, attention_mask=torch.zeros(2, 1, 1, 32))[0]
        unmasked = attention(hidden)[0]
    torch.testing.assert_close(masked, own, atol=1e-6, rtol=1e-6)
    assert torch.equal(unmasked, own)


def test_videomae_visible_tubelets_merge():
    """With bool_masked_pos (VideoMAE's pre-training input) the encoder sees the visible
    tubelets only; they merge among themselves."""
    model, x = make("VideoMAEModel"), inputs("VideoMAEModel")
    hidden = torch.zeros(2, 32, dtype=torch.bool)
    hidden[:, ::4] = True  # 8 of 32 masked in every video
    with torch.no_grad():
        ref = model(**x, bool_masked_pos=hidden).last_hidden_state
        tome.patch(model, r=0)
        torch.testing.assert_close(
            model(**x, bool_masked_pos=hidden).last_hidden_state, ref, atol=1e-5, rtol=0
        )
        tome.patch(model, r=5, unmerge_output=True)
        out = model(**x, bool_masked_pos=hidden).last_hidden_state
    assert model.tome.tokens_per_layer == expected_counts(24, 5, 0)
    assert out.shape == ref.shape == (2, 24, HIDDEN)


def test_videomae_classifier_mean_is_size_weighted():
    model, x = make("VideoMAEForVideoClassification"), inputs("VideoMAEForVideoClassification")
    tome.patch(model, r=6, unmerge_output=False)
    with torch.no_grad():
        out = model(**x, output_hidden_states=True)
        last = out.hidden_states[-1]  # the last layer's output: merged
        sizes = model.tome.sizes[..., None]
        mean = (last * sizes).sum(1) / 32
        expected = model.classifier(model.fc_norm(mean))
    assert last.shape[1] == model.tome.tokens_per_layer[-1] < 32
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)


# -- AST --------------------------------------------------------------------------------------------


def test_ast_keeps_class_and_distillation_tokens_apart():
    model, x = make("ASTModel"), inputs("ASTModel")
    tome.patch(model, r=100)  # as much as every layer can
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(**x)
    assert torch.equal(model.tome.source[:, :2], torch.tensor([[0, 1], [0, 1]]))
    assert torch.all(model.tome.sizes[:, :2] == 1)
    hidden = out.last_hidden_state
    torch.testing.assert_close(out.pooler_output, (hidden[:, 0] + hidden[:, 1]) / 2)


# -- ViT-MAE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_vit_mae_merges_the_patches_the_encoder_receives(mask_ratio):
    """Random masking happens first (in the embeddings); tokens merge among the kept patches, and
    the unmerged output has the model's own length and order, so mask and ids_restore hold."""
    model, x = make("ViTMAEModel", mask_ratio=mask_ratio), inputs("ViTMAEModel")
    kept = int(GRID * GRID * (1 - mask_ratio)) + 1
    with torch.no_grad():
        ref = model(**x)
        tome.patch(model, r=0)
        assert_close(_tensors(model(**x)), _tensors(ref))
        tome.patch(model, r=5, unmerge_output=True)
        out = model(**x)
    assert model.tome.tokens_per_layer == expected_counts(kept, 5, 1)
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (2, kept, HIDDEN)
    assert torch.equal(out.mask, ref.mask) and torch.equal(out.ids_restore, ref.ids_restore)
    cosine = torch.cosine_similarity(out.last_hidden_state[:, 0], ref.last_hidden_state[:, 0])
    assert cosine.min() > 0.5


# -- DINOv2 backbones: feature maps of several stages ---------------------------------------------


def _stage_outputs(model) -> list:
    """Forward hooks recording each layer's output (merged, as the next layer receives it)."""
    seen: list = []
    for layer in model.encoder.layer:
        layer.register_forward_hook(lambda m, a, o, seen=seen: seen.append(o))
    return seen


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("apply_layernorm", [True, False])
def test_backbone_stages_are_unmerged_with_their_own_layers_merges(name, apply_layernorm):
    model = make(name, apply_layernorm=apply_layernorm)
    x = inputs(name)
    spec = SPECS[name]
    tome.patch(model, r=6, unmerge_output=False, unmerge_detail=False)
    layer_outputs = _stage_outputs(model)
    with torch.no_grad():
        maps = model(**x).feature_maps
        histories = [model.tome.history_of(h) for h in layer_outputs]
        expected = []
        for h, history in zip(layer_outputs, histories, strict=True):
            full = h.gather(1, history.source[..., None].expand(-1, -1, HIDDEN))
            if apply_layernorm:
                full = torch.nn.functional.layer_norm(
                    full, (HIDDEN,), model.layernorm.weight, model.layernorm.bias, model.layernorm.eps
                )
            patches = full[:, spec.protected :]
            expected.append(patches.reshape(2, GRID, GRID, HIDDEN).permute(0, 3, 1, 2))
    counts = [h.shape[1] for h in layer_outputs]
    assert counts == expected_counts(spec.tokens, 6, spec.protected)[1:]
    assert len({tuple(hist.sizes.shape) for hist in histories}) == LAYERS  # three different stages
    assert [m.shape for m in maps] == [(2, HIDDEN, GRID, GRID)] * LAYERS
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_backbone_hidden_states_come_back_at_the_original_length():
    model = tome.patch(make("Dinov2Backbone", out_features=["stem", "stage2"]), r=6)
    with torch.no_grad():
        out = model(**inputs("Dinov2Backbone"), output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [GRID * GRID + 1] * (LAYERS + 1)
    assert [m.shape for m in out.feature_maps] == [(2, HIDDEN, GRID, GRID)] * 2
    assert model.tome.tokens_per_layer[-1] < GRID * GRID + 1


def test_backbone_threads_unmerge_each_pass_by_its_own_merges():
    model = tome.patch(make("Dinov2Backbone"), r=6)
    batches = [inputs("Dinov2Backbone", batch=b, seed=b) for b in (1, 2, 3)]
    with torch.no_grad():
        serial = [_feature_maps(model, x) for x in batches]
    results, errors = [], []

    def work(worker: int) -> None:
        try:
            for step in range(6):
                index = (worker + step) % len(batches)
                with torch.no_grad():
                    results.append((index, _feature_maps(model, batches[index])))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for index, maps in results:
        assert_close(maps, serial[index], atol=1e-6)


# -- bad input --------------------------------------------------------------------------------------


class _CustomAttention(torch.nn.Module):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return hidden_states, None


@pytest.mark.parametrize(
    ("name", "layers", "attribute", "message"),
    [
        ("SiglipVisionModel", "encoder.layers", "self_attn", r"layer 1 .*SiglipAttention with a k_proj"),
        ("ASTModel", "layers", "attention", r"layer 1 .*ASTAttention with a k_proj"),
        ("VideoMAEModel", "encoder.layer", "attention", r"layer 1 .*VideoMAEAttention with a attention\.key"),
    ],
)
def test_custom_attention_inside_a_supported_model_is_a_clear_type_error(name, layers, attribute, message):
    model = make(name)
    layer = model.get_submodule(layers)[1]
    setattr(layer, attribute, _CustomAttention())
    with pytest.raises(TypeError, match=message):
        tome.patch(model)
    assert "tome" not in model.__dict__
    assert not any("forward" in m.__dict__ or m._forward_hooks for m in model.modules())


def test_videomae_self_attention_without_its_parts_is_refused():
    model = make("VideoMAEModel")
    del model.encoder.layer[2].attention.attention.query
    with pytest.raises(TypeError, match=r"layer 2 .*query, key, value"):
        tome.patch(model)
    assert "tome" not in model.__dict__


def test_the_support_list_names_the_new_classes():
    from tome.runtime.registry import supported_families

    listed = supported_families()
    for name in [*CLASSES, "CLIPModel"]:
        assert name in listed, name


def test_unsupported_task_models_are_refused():
    vitmae = transformers.ViTMAEForPreTraining(_config("ViTMAEModel"))
    with pytest.raises(TypeError, match="does not support"):
        tome.patch(vitmae)  # its decoder needs every visible token, by ids_restore
