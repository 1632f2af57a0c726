"""tome.patch on Hugging Face transformers: ViT, DINOv2 (with registers), CLIP vision.

Tiny random models for the behaviour; the real DINOv2-S/14 of ../shared for fidelity (slow).
SigLIP / SigLIP2, the CLIP two-tower model, VideoMAE, AST, ViT-MAE and the DINOv2 backbones are
tested in test_patch_transformers_reach.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tome
from tome.core.merge import max_r

transformers = pytest.importorskip("transformers")

from _dinov2_timm import SaliencyHead, load_images, timm_dinov2_from_hf  # noqa: E402

IMG, PATCH, LAYERS = 48, 8, 3
N_PATCHES = (IMG // PATCH) ** 2  # 36
REGISTERS = 2

_VIT = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
            image_size=IMG, patch_size=PATCH)  # fmt: skip
_DINO = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, mlp_ratio=2,
             image_size=IMG, patch_size=PATCH)  # fmt: skip
_CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                    image_size=IMG, patch_size=PATCH)  # fmt: skip
_CLIP_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip


def _config(name: str, **overrides):
    t = transformers
    if name.startswith("ViT"):
        return t.ViTConfig(**{**_VIT, "num_labels": 5, **overrides})
    if name.startswith("Dinov2WithRegisters"):
        return t.Dinov2WithRegistersConfig(
            **{**_DINO, "num_register_tokens": REGISTERS, "num_labels": 5, **overrides}
        )
    if name.startswith("Dinov2"):
        return t.Dinov2Config(**{**_DINO, "num_labels": 5, **overrides})
    if name == "CLIPForImageClassification":
        return t.CLIPConfig(text_config=_CLIP_TEXT, vision_config={**_CLIP_VISION, **overrides}, num_labels=5)
    return t.CLIPVisionConfig(**{**_CLIP_VISION, "projection_dim": 16, **overrides})


CLASSES = [
    "ViTModel",
    "ViTForImageClassification",
    "Dinov2Model",
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel",
    "Dinov2WithRegistersForImageClassification",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPForImageClassification",
]
# Classes whose output has last_hidden_state (the others return logits only).
SEQUENCE_CLASSES = [c for c in CLASSES if "ForImageClassification" not in c]


def make(name: str, attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(transformers, name)(_config(name, **overrides))
    model.set_attn_implementation(attn)
    return model.eval()


def protected(name: str) -> int:
    return 1 + (REGISTERS if name.startswith("Dinov2WithRegisters") else 0)


def num_tokens(name: str) -> int:
    return N_PATCHES + protected(name)


def expected_counts(n: int, r: int, prot: int, layers: int = LAYERS) -> list[int]:
    counts = [n]
    for _ in range(layers):
        counts.append(counts[-1] - min(r, max_r(counts[-1], prot)))
    return counts


def outputs(out) -> dict[str, torch.Tensor]:
    """The tensor fields of a ModelOutput (last_hidden_state, pooler_output, logits, ...)."""
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def inputs(batch: int = 2, size: int = IMG, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def assert_unpatched(model: torch.nn.Module) -> None:
    assert "tome" not in model.__dict__
    for module in model.modules():
        assert "forward" not in module.__dict__, type(module).__name__
        assert not module._forward_hooks, type(module).__name__


# -- equivalence and bookkeeping ---------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_r0_matches_unpatched(name, attn):
    model, x = make(name, attn), inputs()
    with torch.no_grad():
        ref = outputs(model(x))
        tome.patch(model, r=0, unmerge_output=True)
        assert_close(outputs(model(x)), ref)
        tome.patch(model, r=0, unmerge_output=False)
        assert_close(outputs(model(x)), ref)
    assert model.tome.tokens_per_layer == [num_tokens(name)] * (LAYERS + 1)


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("r", [5, 100])
def test_tokens_per_layer(name, r):
    model = tome.patch(make(name), r=r)
    assert model.tome.family == "transformers"
    assert model.tome.protected == protected(name)
    with torch.no_grad():
        out = model(inputs())
    counts = expected_counts(num_tokens(name), r, protected(name))
    assert model.tome.tokens_per_layer == counts
    if "last_hidden_state" in out:
        assert out.last_hidden_state.shape == (2, counts[-1], 32)
    # protected tokens (class, registers) never merge and stay in front, in order
    p = protected(name)
    assert torch.equal(model.tome.source[:, :p], torch.arange(p).expand(2, p))
    assert torch.all(model.tome.sizes[:, :p] == 1)
    assert torch.all(model.tome.sizes.sum(1) == num_tokens(name))


@pytest.mark.parametrize("name", CLASSES)
def test_unpatch_round_trip(name):
    model, x = make(name), inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = outputs(model(x))
        tome.patch(model, r=4, unmerge_output=True)
        model(x)
        assert model.state_dict().keys() == state.keys()
        tome.unpatch(model)
        after = outputs(model(x))
    assert_unpatched(model)
    for k in ref:
        assert torch.equal(after[k], ref[k]), k
    new_state = model.state_dict()
    assert new_state.keys() == state.keys()
    assert all(torch.equal(new_state[k], state[k]) for k in state)


@pytest.mark.parametrize("name", SEQUENCE_CLASSES)
def test_unmerge_output(name):
    model, x = tome.patch(make(name), r=5, unmerge_detail=False), inputs()  # plain copies
    n0, counts = num_tokens(name), expected_counts(num_tokens(name), 5, protected(name))
    with torch.no_grad():
        merged = model(x)
        assert merged.last_hidden_state.shape == (2, counts[-1], 32)
        full = model.tome.unmerge(merged.last_hidden_state)
        assert full.shape == (2, n0, 32)
        assert model.tome.unmerge(full) is full  # already at the original length
        model.tome.unmerge_output = True
        unmerged = model(x)
    assert unmerged.last_hidden_state.shape == (2, n0, 32)
    assert torch.allclose(unmerged.last_hidden_state, full, atol=1e-6)
    # every original token holds the value of the merged token it ended up in
    source = model.tome.source
    gathered = merged.last_hidden_state.gather(1, source[..., None].expand(-1, -1, 32))
    assert torch.allclose(unmerged.last_hidden_state, gathered, atol=1e-6)
    # the class token (pooled outputs) is the same either way
    assert torch.allclose(unmerged.last_hidden_state[:, 0], merged.last_hidden_state[:, 0], atol=1e-6)
    if getattr(merged, "pooler_output", None) is not None:
        assert torch.allclose(unmerged.pooler_output, merged.pooler_output, atol=1e-6)


def _layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    # the functional form: calling the patched module would run tome's output hook
    return torch.nn.functional.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


@pytest.mark.parametrize(
    "name",
    [
        "Dinov2ForImageClassification",
        "Dinov2WithRegistersForImageClassification",
        "CLIPForImageClassification",
    ],
)
@pytest.mark.parametrize("unmerge_output", [False, True])
def test_patch_mean_pooling_is_size_weighted(name, unmerge_output):
    """Heads averaging the patch tokens see each original token once: the size-weighted mean."""
    model, x = make(name), inputs()
    # (unmerge_detail would return the last layer's output at full length, with details)
    tome.patch(model, r=7, unmerge_output=unmerge_output, unmerge_detail=False)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        last = out.hidden_states[-1]  # output of the last layer: merged
        assert last.shape[1] == model.tome.tokens_per_layer[-1] < num_tokens(name)
        sizes = model.tome.sizes[..., None]
        p = protected(name)
        if name.startswith("CLIP"):
            seq = last
            expected = model.classifier((seq[:, p:] * sizes[:, p:]).sum(1) / N_PATCHES)
        else:
            seq = _layer_norm(model.base_model.layernorm, last)
            mean = (seq[:, p:] * sizes[:, p:]).sum(1) / N_PATCHES
            expected = model.classifier(torch.cat([seq[:, 0], mean], dim=1))
    assert torch.allclose(out.logits, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["ViTForImageClassification", "CLIPVisionModelWithProjection"])
def test_class_token_heads_read_index_0(name):
    model = tome.patch(make(name), r=7)
    with torch.no_grad():
        out = model(inputs(), output_hidden_states=True)
        last = out.hidden_states[-1]
        if name.startswith("ViT"):
            expected = model.classifier(_layer_norm(model.vit.layernorm, last)[:, 0])
            assert torch.allclose(out.logits, expected, atol=1e-5)
        else:
            pooled = model.vision_model.post_layernorm(last[:, 0])
            assert torch.allclose(out.image_embeds, model.visual_projection(pooled), atol=1e-5)


# -- proportional attention ----------------------------------------------------------------------


def _record_masks(model: torch.nn.Module) -> tuple[list, list]:
    masks, handles = [], []
    for module in model.modules():
        if hasattr(module, "k_proj"):  # an attention module

            def hook(module, args, kwargs, masks=masks):
                masks.append(kwargs.get("attention_mask"))

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return masks, handles


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2WithRegistersModel", "CLIPVisionModel"])
def test_prop_attn_passes_log_sizes_as_attention_mask(name):
    model, x = make(name), inputs()
    tome.patch(model, r=6, prop_attn=True)
    masks, handles = _record_masks(model)
    with torch.no_grad():
        with_prop = model(x).last_hidden_state
    counts = model.tome.tokens_per_layer
    assert masks[0] is None  # nothing merged yet
    for i, mask in enumerate(masks[1:], start=1):
        assert mask.shape == (2, 1, 1, counts[i]) and mask.dtype == torch.float32
        sizes = mask.exp()
        assert torch.allclose(sizes, sizes.round(), atol=1e-4) and torch.all(sizes >= 1 - 1e-5)
        assert torch.allclose(sizes.sum(-1), torch.full((2, 1, 1), float(num_tokens(name))))
    masks.clear()
    model.tome.prop_attn = False
    with torch.no_grad():
        without = model(x).last_hidden_state
    assert masks == [None] * LAYERS
    assert with_prop.shape == without.shape and not torch.allclose(with_prop, without, atol=1e-4)
    for h in handles:
        h.remove()


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("prop_attn", [True, False])
def test_eager_and_sdpa_agree_while_merging(name, prop_attn):
    x = inputs()
    results = []
    for attn in ("eager", "sdpa"):
        model = tome.patch(make(name, attn), r=6, prop_attn=prop_attn, unmerge_output=True)
        with torch.no_grad():
            results.append((outputs(model(x)), model.tome.source, model.tome.tokens_per_layer))
    (a, source_a, counts_a), (b, source_b, counts_b) = results
    assert counts_a == counts_b and torch.equal(source_a, source_b)
    assert_close(a, b)


def test_prop_attn_needs_a_float_mask_implementation():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("tome_test_unknown", sdpa_attention_forward)
    model, x = make("Dinov2Model"), inputs()
    with torch.no_grad():
        ref = tome.patch(model, r=6, prop_attn=False)(x).last_hidden_state
        model.set_attn_implementation("tome_test_unknown")
        assert torch.allclose(model(x).last_hidden_state, ref, atol=1e-6)  # no mask: any implementation
        tome.patch(model, r=6, prop_attn=True)
        with pytest.raises(ValueError, match="prop_attn=False"):
            model(x)


# -- training ----------------------------------------------------------------------------------------


def _loss(out) -> torch.Tensor:
    return sum(v.float().pow(2).mean() for v in outputs(out).values())


@pytest.mark.parametrize("name", CLASSES)
def test_backward(name):
    model = make(name, drop_path_rate=0.1) if name.startswith("Dinov2") else make(name)
    model.train()
    tome.patch(model, r=6, unmerge_output=True)
    _loss(model(inputs())).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any("patch" in n for n in grads)  # gradients reach the patch embedding through merges
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize(
    "name", ["ViTForImageClassification", "Dinov2ForImageClassification", "CLIPVisionModel"]
)
def test_gradient_checkpointing(name):
    x = inputs()
    grads, counts = [], []
    for checkpointing in (False, True):
        model = make(name).train()  # dropout probabilities are 0: both runs are deterministic
        if checkpointing:
            model.gradient_checkpointing_enable()
        tome.patch(model, r=6)
        calls = []
        first_layer = next(m for m in model.modules() if hasattr(m, "k_proj"))
        first_layer.k_proj.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        _loss(model(x)).backward()
        assert len(calls) == (2 if checkpointing else 1)  # the layer really was recomputed
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        counts.append(model.tome.tokens_per_layer)
    assert counts[0] == counts[1] == expected_counts(num_tokens(name), 6, 1)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), k


def test_checkpointed_layers_recompute_their_own_pass():
    """Two forward passes, then one backward: the first pass's layers are recomputed with the
    first pass's merges (the history is bound outside the checkpoint)."""
    x1, x2 = inputs(seed=1), inputs(seed=2)

    def grad(checkpointing: bool, both: bool) -> torch.Tensor:
        model = make("Dinov2Model").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        tome.patch(model, r=6)
        loss = _loss(model(x1))
        if both:
            loss = loss + 0 * _loss(model(x2))
        loss.backward()
        return model.embeddings.patch_embeddings.projection.weight.grad

    assert torch.allclose(grad(True, both=True), grad(False, both=False), atol=1e-6)


# -- shapes, resolutions, several models ------------------------------------------------------------


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2Model", "Dinov2WithRegistersModel", "CLIPVisionModel"])
def test_other_resolution_and_batch_one(name):
    model, x = make(name), inputs(batch=1, size=64)
    kwargs = {} if name.startswith("Dinov2") else {"interpolate_pos_encoding": True}
    n0 = (64 // PATCH) ** 2 + protected(name)
    with torch.no_grad():
        ref = model(x, **kwargs).last_hidden_state
        tome.patch(model, r=0)
        assert torch.allclose(model(x, **kwargs).last_hidden_state, ref, atol=1e-5)
        tome.patch(model, r=9, unmerge_output=True)
        out = model(x, **kwargs).last_hidden_state
    assert model.tome.tokens_per_layer == expected_counts(n0, 9, protected(name))
    assert out.shape == (1, n0, 32)


def test_output_hidden_states_and_attentions_have_merged_lengths():
    model = tome.patch(make("ViTModel", "eager"), r=5)
    with torch.no_grad():
        out = model(inputs(), output_hidden_states=True, output_attentions=True)
    counts = model.tome.tokens_per_layer
    assert [h.shape[1] for h in out.hidden_states] == [counts[0], *counts[1:]]
    assert [a.shape[-2:] for a in out.attentions] == [(n, n) for n in counts[:-1]]


def test_two_patched_models_in_one_process():
    a, b = make("ViTModel", seed=0), make("Dinov2WithRegistersModel", seed=1)
    x = inputs()
    with torch.no_grad():
        tome.patch(a, r=3)
        alone = a(x).last_hidden_state
        tome.patch(b, r=8, unmerge_output=True)
        out_b = b(x).last_hidden_state
        out_a = a(x).last_hidden_state
    assert torch.equal(out_a, alone)
    assert a.tome.tokens_per_layer == expected_counts(num_tokens("ViTModel"), 3, 1)
    assert b.tome.tokens_per_layer == expected_counts(num_tokens("Dinov2WithRegistersModel"), 8, 3)
    assert out_b.shape == (2, num_tokens("Dinov2WithRegistersModel"), 32)


@pytest.mark.parametrize("name", ["ViTModel", "CLIPVisionModelWithProjection"])
def test_patch_twice_is_one_patch_with_new_args(name):
    x = inputs()
    once = tome.patch(make(name), r=5, unmerge_output=True)
    twice = tome.patch(tome.patch(make(name), r=2, prop_attn=False), r=5, unmerge_output=True)
    assert twice.tome.prop_attn and twice.tome.unmerge_output and twice.tome.r == 5
    for model in (once, twice):
        hooks = [m for m in model.modules() if m._forward_hooks]
        assert len(hooks) == LAYERS + 1  # one key hook per layer, one output hook
    with torch.no_grad():
        assert_close(outputs(once(x)), outputs(twice(x)), atol=0)
    tome.unpatch(twice)
    assert_unpatched(twice)


def test_r_schedule_and_setter():
    model, x = tome.patch(make("Dinov2Model"), r=[4, 0, 2]), inputs()
    with torch.no_grad():
        model(x)
        assert model.tome.tokens_per_layer == [37, 33, 33, 31]
        model.tome.r = 0
        model(x)
    assert model.tome.tokens_per_layer == [37] * 4


def test_half_precision():
    model = make("Dinov2Model").to(torch.bfloat16)
    tome.patch(model, r=6, unmerge_output=True)
    with torch.no_grad():
        out = model(inputs().to(torch.bfloat16)).last_hidden_state
    assert out.dtype == torch.bfloat16 and out.shape == (2, 37, 32) and torch.isfinite(out).all()


# -- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_user_attention_mask_is_honoured_while_merging(attn):
    model, x = make("Dinov2Model", attn), inputs()
    mask = torch.ones(2, 37)
    mask[0, -5:] = 0  # sample 0: its last 5 patches are padding
    with torch.no_grad():
        ref = model(x, attention_mask=mask).last_hidden_state
        tome.patch(model, r=0)
        torch.testing.assert_close(model(x, attention_mask=mask).last_hidden_state, ref, atol=1e-5, rtol=1e-5)
        model.tome.r = 4
        out = model(x, attention_mask=mask).last_hidden_state
        source = model.tome.source
        # Changing what the padded patches hold changes nothing for the real tokens.
        x2 = x.clone()
        x2[0, :, -8:, -8:] = torch.randn(3, 8, 8)  # the last patch of sample 0 (padding)
        out2 = model(x2, attention_mask=mask).last_hidden_state
    assert out.shape[1] == model.tome.tokens_per_layer[-1] < 37
    padding = source[0, -5:]
    assert not set(padding.tolist()) & set(source[0, :-5].tolist()), "padding merged with real tokens"
    real = sorted(set(source[0, :-5].tolist()))
    torch.testing.assert_close(out2[0, real], out[0, real], atol=1e-5, rtol=1e-5)


def test_model_built_mask_under_export_merges():
    model, x = make("Dinov2Model"), inputs()
    tome.patch(model, r=4)

    class Features(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixels):
            return self.inner(pixel_values=pixels).last_hidden_state

    with torch.no_grad():
        ref = Features(model)(x)
        exported = torch.export.export(Features(model), (x,))
        torch.testing.assert_close(exported.module()(x), ref, atol=1e-5, rtol=1e-5)
    assert ref.shape[1] == model.tome.tokens_per_layer[-1] < 37


def test_unexpected_structure_raises_type_error_and_leaves_model_unpatched():
    model = make("Dinov2Model")
    del model.encoder.layer[1].attention.k_proj
    with pytest.raises(TypeError, match="k_proj"):
        tome.patch(model)
    assert_unpatched(model)

    model = make("ViTModel")
    model.layers[2].mlp = None
    with pytest.raises(TypeError, match="layer 2"):
        tome.patch(model)
    assert_unpatched(model)


def test_unsupported_transformers_class_raises_type_error():
    model = transformers.ViTForMaskedImageModeling(_config("ViTModel", encoder_stride=PATCH))
    with pytest.raises(TypeError, match="does not support"):
        tome.patch(model)


def test_import_tome_does_not_import_transformers():
    code = (
        "import sys, tome, tome.adapters.transformers_vision; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# -- the real DINOv2-S/14 (../shared) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(dinov2_dir, images_dir):
    """The pretrained model, 8 photos, and the unpatched outputs."""
    model = transformers.Dinov2Model.from_pretrained(dinov2_dir).eval()
    x = load_images(images_dir, 8)
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


@pytest.mark.slow
def test_real_dinov2_class_token_fidelity_and_saliency_after_unmerge(real, dinov2_dir):
    model, x, ref = real
    head = SaliencyHead.load(dinov2_dir / "saliency_head.safetensors")
    try:
        tome.patch(model, r=16, unmerge_output=True)
        with torch.no_grad():
            out = model(x)
            assert model.tome.tokens_per_layer[-1] == 257 - 12 * 16
            saliency = head(out.last_hidden_state[:, 1:], (224, 224))
            saliency_ref = head(ref.last_hidden_state[:, 1:], (224, 224))
    finally:
        tome.unpatch(model)
    cosine = torch.cosine_similarity(out.pooler_output, ref.pooler_output)
    assert cosine.mean() >= 0.98, cosine
    pairs = zip(saliency.flatten(1), saliency_ref.flatten(1), strict=True)
    corr = torch.stack([torch.corrcoef(torch.stack(pair))[0, 1] for pair in pairs])
    assert corr.mean() > 0.95 and corr.min() > 0.9, corr


@pytest.mark.slow
def test_real_dinov2_agrees_with_timm(real):
    pytest.importorskip("timm")
    model, x, ref = real
    x, ref_tokens = x[:4], ref.last_hidden_state[:4]
    timm_model = timm_dinov2_from_hf(model)
    with torch.no_grad():
        assert torch.allclose(timm_model.forward_features(x), ref_tokens, atol=1e-4)
        try:
            for r in (0, 8, 16):
                tome.patch(model, r=r)
                tome.patch(timm_model, r=r)
                hf_cls = model(x).pooler_output
                timm_cls = timm_model.forward_features(x)[:, 0]
                assert model.tome.tokens_per_layer == timm_model.tome.tokens_per_layer
                cosine = torch.cosine_similarity(hf_cls, timm_cls)
                assert cosine.min() > 0.999, (r, cosine)
        finally:
            tome.unpatch(model)
            tome.unpatch(timm_model)


def _hooks_and_forwards(model: torch.nn.Module) -> list[tuple[int, bool]]:
    return [(len(m._forward_hooks), "forward" in m.__dict__) for m in model.modules()]


def test_patching_a_model_and_its_backbone_fails_cleanly():
    """Patching the classifier when its backbone is patched (or the other way round) is a clear
    error that leaves every hook and forward as it was."""
    pixels = torch.randn(2, 3, IMG, IMG)
    clf = make("ViTForImageClassification")
    tome.patch(clf.vit, r=4)
    with torch.no_grad():
        before, state = clf(pixel_values=pixels).logits, _hooks_and_forwards(clf)
    with pytest.raises(ValueError, match=r"submodule 'vit' is already patched.*tome.unpatch\(model.vit\)"):
        tome.patch(clf, r=4)
    assert _hooks_and_forwards(clf) == state and not hasattr(clf, "tome")
    with torch.no_grad():
        assert torch.equal(clf(pixel_values=pixels).logits, before)
    tome.unpatch(clf.vit)

    tome.patch(clf, r=4)
    with torch.no_grad():
        before, state = clf(pixel_values=pixels).logits, _hooks_and_forwards(clf)
    with pytest.raises(RuntimeError, match=r"already replaced.*unpatch it first"):
        tome.patch(clf.vit, r=2)
    assert _hooks_and_forwards(clf) == state and not hasattr(clf.vit, "tome")
    with torch.no_grad():
        assert torch.equal(clf(pixel_values=pixels).logits, before)
    tome.unpatch(clf)
    assert all(hooks == 0 and not replaced for hooks, replaced in _hooks_and_forwards(clf))
