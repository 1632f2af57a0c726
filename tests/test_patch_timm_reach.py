"""tome.patch on tiny random timm ``Eva`` (RoPE) and ``NaFlexVit`` models (no downloads)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
from _patching import expected_counts, patched_state

import tome

timm = pytest.importorskip("timm")
from timm.layers.pos_embed_sincos import apply_rot_embed_cat  # noqa: E402
from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg  # noqa: E402

from tome.adapters import timm_eva  # noqa: E402
from tome.core.merge import MergeHistory  # noqa: E402

SMALL = {"embed_dim": 64, "num_heads": 2, "depth": 3, "num_classes": 10}

# name -> (timm model name, extra kwargs, input resolution)
EVA = {
    "eva02": ("eva02_tiny_patch14_224", {}, 56),  # EvaAttention, SwiGLU, axial RoPE, avg pool
    "rope_vit": ("vit_small_patch16_rope_224", {}, 64),  # AttentionRope, class-token pooling
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}, 64),  # learned per-depth RoPE
    "dinov3": ("vit_base_patch16_dinov3", {}, 64),  # class + 4 registers, LayerScale, DINOv3 RoPE
    "pe_attn_pool": ("vit_pe_core_tiny_patch16_384", {}, 64),  # attention pooling head
    "post_norm": ("eva02_enormous_patch14_clip_224", {}, 56),  # EvaBlockPostNorm, no RoPE
}


def _sharpen(model: nn.Module) -> None:
    # Random init gives near-uniform attention, where positions change nothing: scale the
    # query/key projections so that attention (and RoPE) matters; LayerScale and the head get weight.
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("qkv", "q_proj", "k_proj"):
                module.weight.mul_(6.0)
            if name == "head" and isinstance(module, nn.Linear):  # timm inits it near zero
                nn.init.normal_(module.weight, std=0.2)
            for gamma in ("gamma_1", "gamma_2", "gamma"):
                if isinstance(getattr(module, gamma, None), nn.Parameter):
                    getattr(module, gamma).fill_(0.5)


def make_eva(name: str = "eva02", seed: int = 0, **overrides) -> tuple[nn.Module, torch.Tensor]:
    model_name, kwargs, size = EVA[name]
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, img_size=size, **{**SMALL, **kwargs, **overrides})
    _sharpen(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval(), x


def num_tokens(model: nn.Module, x: torch.Tensor) -> int:
    grid = model.patch_embed.dynamic_feat_size(x.shape[-2:])
    return grid[0] * grid[1] + model.num_prefix_tokens


# -- Eva -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EVA))
def test_eva_r0_matches_unpatched(name):
    model, x = make_eva(name)
    with torch.no_grad():
        ref = model(x)
        tome.patch(model, r=0)
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert model.tome.family == "timm"
    assert model.tome.tokens_per_layer == [num_tokens(model, x)] * 4


@pytest.mark.parametrize("name", list(EVA))
def test_eva_merges_as_scheduled_and_keeps_prefix_tokens(name):
    model, x = make_eva(name)
    n0, p = num_tokens(model, x), model.num_prefix_tokens
    with torch.no_grad():
        ref = model(x)
        tome.patch(model, r=3)
        out = model(x)
    assert model.tome.tokens_per_layer == expected_counts(n0, [3, 3, 3], p)
    sizes, source = model.tome.sizes, model.tome.source
    assert (sizes.sum(1) == n0).all() and (sizes[:, :p] == 1).all()
    assert torch.equal(source[:, :p], torch.arange(p).expand(2, p))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("name", ["eva02", "rope_mixed", "post_norm"])
def test_eva_unpatch_is_bit_identical(name):
    model, x = make_eva(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        tome.patch(model, r=4)
        model(x)
        tome.unpatch(model)
        out = model(x)
    assert torch.equal(out, ref)
    assert patched_state(model) == [] and "tome" not in model.__dict__
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_eva_schedules_ratio_and_unmerge_output():
    model, x = make_eva("dinov3")
    n0 = num_tokens(model, x)
    tome.patch(model, ratio=0.25)
    with torch.no_grad():
        model(x)
        assert model.tome.tokens_per_layer == model.tome.planned_tokens(n0)
        model.tome.r = (4, -1.0)
        merged = model.forward_features(x)
        assert model.tome.tokens_per_layer == expected_counts(n0, [8, 4, 0], 5)
        model.tome.unmerge_output = True
        full = model.forward_features(x)
    assert merged.shape[1] == model.tome.tokens_per_layer[-1] and full.shape == (2, n0, 64)
    torch.testing.assert_close(full, model.tome.unmerge(merged))


def test_eva_dynamic_img_size_two_resolutions():
    model, _ = make_eva("rope_vit", dynamic_img_size=True)
    tome.patch(model, r=3)
    for side in (64, 96):
        x = torch.randn(1, 3, side, side)
        with torch.no_grad():
            model(x)
        n0 = (side // 16) ** 2 + 1
        assert model.tome.tokens_per_layer == expected_counts(n0, [3, 3, 3], 1)


def test_eva_avg_pool_is_size_weighted():
    model, x = make_eva("eva02")  # global_pool="avg" over the patch tokens, then fc_norm
    tome.patch(model, r=4)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
    sizes = model.tome.sizes[:, 1:, None]
    mean = (tokens[:, 1:] * sizes).sum(1) / sizes.sum(1)
    torch.testing.assert_close(pooled, model.fc_norm(mean), atol=1e-5, rtol=1e-5)


# -- rotary positions of merged tokens -------------------------------------------------------------


def _history(groups: list[list[int]], protected: int = 1) -> MergeHistory:
    """A one-row history whose merged patches hold the given original patches."""
    n0 = sum(len(g) for g in groups) + protected
    source = torch.empty(n0, dtype=torch.long)
    source[:protected] = torch.arange(protected)
    for index, group in enumerate(groups):
        source[torch.tensor(group) + protected] = index + protected
    sizes = torch.tensor([1.0] * protected + [float(len(g)) for g in groups])
    return MergeHistory(source[None], sizes[None])


def _rope(angles: torch.Tensor) -> torch.Tensor:
    """timm's interleaved ``sin | cos`` layout for angles ``(N, F)``: ``(N, 4F)``."""
    return torch.cat([angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)], -1)


def test_merged_rope_is_the_size_weighted_mean_of_sin_and_cos():
    torch.manual_seed(0)
    angles = torch.rand(7, 3) * 6
    rope = _rope(angles)
    groups = [[0, 3, 4], [1], [2, 6], [5]]
    history = _history(groups)
    mean = timm_eva.merged_rope(rope, history, protected=1, how="mean")[0, 0]
    for index, group in enumerate(groups):
        torch.testing.assert_close(mean[index], rope[group].mean(0))
    normalized = timm_eva.merged_rope(rope, history, protected=1, how="normalized")[0, 0]
    sin, cos = normalized.chunk(2, -1)
    torch.testing.assert_close(sin**2 + cos**2, torch.ones_like(sin))
    first = timm_eva.merged_rope(rope, history, protected=1, how="first")[0, 0]
    assert torch.equal(first, rope[[0, 1, 2, 5]])
    # per-head (mixed) and batched embeddings keep their head dimension
    per_head = torch.stack([rope, rope * 0.5])
    assert timm_eva.merged_rope(per_head, history, 1).shape == (1, 2, 4, 12)
    with pytest.raises(ValueError, match=r"rotary embedding of the 7 original patch tokens"):
        timm_eva.merged_rope(rope[:5], history, 1)


def test_merged_rope_mean_gives_each_query_the_mean_logit_of_the_group():
    # Rotations are linear in q and k: a key of the group's content with the mean embedding
    # gives every query the mean of the logits its original keys had (the RoPE counterpart of
    # ToMe's averaging of the tokens).
    torch.manual_seed(1)
    angles = torch.rand(5, 4) * 20
    rope = _rope(angles)
    group = [0, 2, 3]
    merged = timm_eva.merged_rope(rope, _history([group, [1], [4]]), protected=1)[0, 0, 0]
    content, query = torch.randn(8), torch.randn(8)  # head_dim 8: 4 frequencies
    q = apply_rot_embed_cat(query[None], rope[1:2])[0]  # a query at patch 1
    keys = apply_rot_embed_cat(content.expand(3, 8), rope[group])
    merged_key = apply_rot_embed_cat(content[None], merged[None])[0]
    torch.testing.assert_close(q @ merged_key, (keys @ q).mean())


def test_rope_merge_is_settable_and_checked():
    model, x = make_eva("rope_vit")
    tome.patch(model, r=4)
    assert model.tome.rope_merge == "mean"
    outputs = {}
    with torch.no_grad():
        for how in timm_eva.ROPE_MERGES:
            model.tome.rope_merge = how
            outputs[how] = model(x)
        # checked when set (and as a tome.patch keyword), not first in a forward
        with pytest.raises(ValueError, match=r"rope_merge: expected one of mean, normalized, first"):
            model.tome.rope_merge = "angles"
        with pytest.raises(ValueError, match=r"rope_merge: expected one of mean, normalized, first"):
            tome.patch(model, r=4, rope_merge="angles")
        assert model.tome.rope_merge == "first"  # the failed patch left the model as it was
    assert not torch.allclose(outputs["mean"], outputs["first"], atol=1e-4)
    assert not torch.allclose(outputs["mean"], outputs["normalized"], atol=1e-4)


# -- Eva: copies, compile, training, errors --------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_eva_copies_are_independent_patched_models(how):
    model, x = make_eva("rope_mixed")
    tome.patch(model, r=4)
    model.tome.rope_merge = "normalized"
    with torch.no_grad():
        merged = model(x)
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(twin(x), merged)
        assert twin.tome.rope_merge == "normalized"
        twin.tome.r = 0
        assert model.tome.r == 4
        tome.unpatch(twin)
        assert torch.equal(model(x), merged)
    assert patched_state(twin) == []


def test_eva_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model, x = make_eva("eva02", depth=2)
    tome.patch(model, r=4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(x)
        counts = list(model.tome.tokens_per_layer)
        ref = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert counts == model.tome.tokens_per_layer == expected_counts(17, [4, 4], 1)


def test_eva_torch_export_matches_eager():
    model, x = make_eva("rope_vit", depth=2)
    tome.patch(model, r=4)
    with torch.no_grad():
        ref = model(x)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), ref, atol=1e-5, rtol=1e-5)
    assert model.tome.tokens_per_layer == expected_counts(17, [4, 4], 1)


def test_eva_training_with_patch_dropout_and_checkpointing():
    model, x = make_eva("eva02", patch_drop_rate=0.25)
    tome.patch(model, r=2)
    model.train()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert model.patch_embed.proj.weight.grad is not None
    assert model.tome.tokens_per_layer[-1] < model.tome.tokens_per_layer[0]


@pytest.mark.parametrize("family", ["eva", "naflex"])
def test_forward_intermediates_is_the_models_own_at_r0_and_refused_while_merging(family):
    if family == "eva":
        model, x = make_eva("eva02")
    else:
        model, x = make_naflex("rope"), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_intermediates(x, indices=2)
        tome.patch(model, r=0)
        out = model.forward_intermediates(x, indices=2)
        model.tome.r = 2
        with pytest.raises(NotImplementedError, match=r"forward_intermediates of a merging model"):
            model.forward_intermediates(x, indices=2)
    torch.testing.assert_close(out[0], ref[0])
    for a, b in zip(out[1], ref[1], strict=True):
        torch.testing.assert_close(a, b)


def test_eva_user_attention_mask_is_refused_while_merging():
    model, x = make_eva("eva02")
    tome.patch(model, r=2)
    mask = torch.zeros(2, 1, 17, 17)
    with pytest.raises(ValueError, match=r"cannot merge tokens under a user attn_mask"), torch.no_grad():
        model(x, attn_mask=mask)
    model.tome.r = 0
    with torch.no_grad():
        model(x, attn_mask=mask)


class _OwnAttention(nn.Module):
    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        return x


def test_eva_unsupported_block_layout_is_a_clear_error():
    model, _ = make_eva("eva02")
    model.blocks[1].attn = _OwnAttention()
    with pytest.raises(
        TypeError, match=r"timm Eva block 1 uses attention _OwnAttention; supported: timm's EvaAttention"
    ):
        tome.patch(model, r=2)
    assert patched_state(model) == [] and "tome" not in model.__dict__
    model, _ = make_eva("eva02")
    model.blocks[2] = nn.Identity()
    with pytest.raises(
        TypeError, match=r"timm Eva block 2 is a Identity; supported: timm.models.eva.EvaBlock"
    ):
        tome.patch(model, r=2)


def test_support_list_names_eva_and_naflexvit():
    from tome.runtime.registry import supported_families

    assert "timm: Eva, NaFlexVit, VisionTransformer" in supported_families()


# -- NaFlexVit -------------------------------------------------------------------------------------

PATCH = 8
NAFLEX = {
    "vit": {"global_pool": "avg"},  # timm's ViT Block, learned position embedding
    "rope": {"rope_type": "axial", "pos_embed": "none", "global_pool": "avg"},  # EvaBlock, RoPE
    "rope_mixed": {"rope_type": "mixed", "pos_embed": "none", "class_token": True, "global_pool": "token"},
    "registers_map": {"class_token": True, "reg_tokens": 2, "global_pool": "map"},
    "key_only_mask": {"use_key_only_attn_mask": True, "global_pool": "avg"},
}


def make_naflex(name: str = "vit", seed: int = 0, **overrides) -> NaFlexVit:
    torch.manual_seed(seed)
    base = {"patch_size": PATCH, "embed_dim": 64, "depth": 3, "num_heads": 2, "pos_embed_grid_size": (8, 8)}
    cfg = NaFlexVitCfg(**{**base, **NAFLEX[name], **overrides})
    model = NaFlexVit(cfg, num_classes=10)
    _sharpen(model)
    return model.eval()


def naflex_batch(shapes: list[tuple[int, int]], length: int, seed: int = 3) -> tuple[dict, list[dict]]:
    """A padded NaFlex batch of images with the given patch grids, and each image alone."""
    g = torch.Generator().manual_seed(seed)
    B, features = len(shapes), PATCH * PATCH * 3
    batch = {
        "patches": torch.zeros(B, length, features),
        "patch_coord": torch.zeros(B, length, 2, dtype=torch.long),
        "patch_valid": torch.zeros(B, length, dtype=torch.bool),
    }
    alone = []
    for i, (h, w) in enumerate(shapes):
        patches = torch.randn(h * w, features, generator=g)
        coord = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(
            -1, 2
        )
        batch["patches"][i, : h * w], batch["patch_coord"][i, : h * w] = patches, coord
        batch["patch_valid"][i, : h * w] = True
        alone.append(
            {
                "patches": patches[None],
                "patch_coord": coord[None],
                "patch_valid": torch.ones(1, h * w, dtype=torch.bool),
            }
        )
    return batch, alone


SHAPES = [(6, 6), (4, 5), (3, 3)]


@pytest.mark.parametrize("name", list(NAFLEX))
def test_naflex_r0_matches_unpatched(name):
    model = make_naflex(name)
    batch, _ = naflex_batch(SHAPES, 40)
    with torch.no_grad():
        ref = model(batch)
        tome.patch(model, r=0)
        out = model(batch)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:tome. the schedule")  # the 3 x 3 image alone: r capped
@pytest.mark.parametrize("name", list(NAFLEX))
@pytest.mark.parametrize("schedule", [{"r": 4}, {"ratio": 0.3}])
def test_naflex_image_gives_its_own_output_in_a_padded_batch(name, schedule):
    model = make_naflex(name)
    batch, alone = naflex_batch(SHAPES, 40)
    p = model.num_prefix_tokens
    with torch.no_grad():
        ref = model(batch)
        tome.patch(model, **schedule)
        out = model(batch)
        sizes, counts = model.tome.sizes, model.tome.tokens_per_layer
        for i, single in enumerate(alone):
            torch.testing.assert_close(out[i], model(single)[0], atol=1e-5, rtol=1e-4)
    assert counts[-1] < counts[0] == 40 + p
    # padding has size 0: each image's merged tokens hold its own patches and nothing else
    assert sizes.sum(1).tolist() == [h * w + p for h, w in SHAPES]
    assert not torch.allclose(out, ref, atol=1e-4)


def test_naflex_padding_never_merges_with_real_patches_and_changes_nothing():
    model = tome.patch(make_naflex("rope"), r=5)
    batch, _ = naflex_batch(SHAPES, 40)
    noisy = {**batch, "patches": batch["patches"].clone()}
    noisy["patches"][~batch["patch_valid"]] = torch.randn(
        int((~batch["patch_valid"]).sum()), PATCH * PATCH * 3
    )
    with torch.no_grad():
        out = model(batch)
        source, sizes = model.tome.source, model.tome.sizes
        torch.testing.assert_close(model(noisy), out, atol=1e-5, rtol=1e-5)
    for row, (h, w) in enumerate(SHAPES):
        real = set(source[row, : h * w].tolist())
        assert all(sizes[row, g] > 0 for g in real)
        assert all(sizes[row, g] == 0 for g in set(source[row, h * w :].tolist()) - real)


def test_naflex_ratio_small_images_lose_few_tokens_large_ones_many():
    model = tome.patch(make_naflex("vit"), ratio=0.25)
    batch, _ = naflex_batch([(8, 8), (3, 3)], 64)
    with torch.no_grad():
        model(batch)
    real = (model.tome.sizes > 0).sum(1).tolist()
    expected = []
    for n in (64, 9):
        for _ in range(3):
            n -= min(int(n * 0.25), n // 2)
        expected.append(n)
    assert real == expected


def test_naflex_forward_features_and_unmerge_output():
    model = tome.patch(make_naflex("registers_map"), r=4)
    batch, _ = naflex_batch(SHAPES, 40)
    with torch.no_grad():
        features = model.forward_features(**batch)
        assert features["patches"].shape[1] == model.tome.tokens_per_layer[-1] < 43
        assert torch.equal(features["patch_valid"], batch["patch_valid"])
        model.tome.unmerge_output = True
        full = model.forward_features(**batch)
        assert full["patches"].shape == (3, 43, 64)
        torch.testing.assert_close(model.forward_head(**full), model(batch), atol=1e-6, rtol=1e-6)


def test_naflex_standard_image_input_merges_too():
    model = make_naflex("rope")
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        ref = model(x)
        tome.patch(model, r=0)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
        model.tome.r = 5
        assert model(x).shape == ref.shape
    assert model.tome.tokens_per_layer == expected_counts(30, [5, 5, 5], 0)


def test_naflex_mask_that_is_not_key_padding_is_refused():
    model = tome.patch(make_naflex("vit"), r=3)
    batch, _ = naflex_batch(SHAPES, 40)
    mask = torch.zeros(3, 1, 40, 40)
    mask[:, :, :, 30:] = torch.finfo(torch.float32).min  # keys 30.. masked for every query
    mask[0, :, 5, 7] = torch.finfo(torch.float32).min  # and one real pair in image 0
    for schedule in (3, [0, 3, 3]):  # merging from block 0, or in later blocks only
        model.tome.r = schedule
        with pytest.raises(ValueError, match=r"key-padding mask only"), torch.no_grad():
            model(
                batch["patches"],
                patch_coord=batch["patch_coord"],
                patch_valid=batch["patch_valid"],
                attn_mask=mask,
            )
    model.tome.r = 3
    mask[0, :, 5, 7] = 0.0  # a key-padding mask of the user's own: honoured
    with torch.no_grad():
        model(
            batch["patches"],
            patch_coord=batch["patch_coord"],
            patch_valid=batch["patch_valid"],
            attn_mask=mask,
        )
    assert (model.tome.sizes[:, :].sum(1) == 30).all()


def test_naflex_unpatch_copies_and_pickles():
    model = make_naflex("rope_mixed")
    batch, _ = naflex_batch(SHAPES, 40)
    with torch.no_grad():
        ref = model(batch)
        tome.patch(model, r=4)
        merged = model(batch)
        twin = pickle.loads(pickle.dumps(model))
        clone = copy.deepcopy(model)
        assert torch.equal(twin(batch), merged) and torch.equal(clone(batch), merged)
        tome.unpatch(model)
        assert torch.equal(model(batch), ref)
        assert torch.equal(twin(batch), merged)
    assert patched_state(model) == []


@pytest.mark.parametrize("name", ["vit", pytest.param("rope", marks=pytest.mark.slow)])
def test_naflex_compile_matches_eager(name):
    # Not fullgraph: NaFlexVit's own embedding and rope code is torch.compiler.disable()d.
    torch._dynamo.reset()
    model = tome.patch(make_naflex(name, depth=2), r=3)
    batch, _ = naflex_batch(SHAPES, 40)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        out = compiled(batch)
        counts = list(model.tome.tokens_per_layer)
        ref = model(batch)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert counts == model.tome.tokens_per_layer == [40, 37, 34]


class _OwnBlock(nn.Module):
    def forward(self, x, attn_mask=None):
        return x


def test_naflex_unsupported_block_is_a_clear_error():
    model = make_naflex("vit")
    model.blocks[0] = _OwnBlock()
    with pytest.raises(
        TypeError, match=r"NaFlexVit block 0 is a _OwnBlock; supported: timm.models.vision_transformer.Block"
    ):
        tome.patch(model, r=2)
    assert patched_state(model) == []
