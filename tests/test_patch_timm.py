"""tome.patch on tiny random timm VisionTransformers (no downloads)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _patching import expected_counts

import tome

timm = pytest.importorskip("timm")

SMALL = {"embed_dim": 64, "num_heads": 2, "depth": 3, "num_classes": 10}

# name -> (model name, kwargs, input resolution)
CONFIGS = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 64}, 64),
    "dinov2_layerscale": ("vit_small_patch14_dinov2", {"img_size": 56}, 56),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 56}, 56),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64),
    "avgpool_no_cls": (
        "vit_tiny_patch16_224",
        {"img_size": 64, "class_token": False, "global_pool": "avg"},
        64,
    ),
    "qk_norm": ("vit_tiny_patch16_224", {"img_size": 64, "qk_norm": True}, 64),
}


def make(name: str = "vit", seed: int = 0, **overrides) -> tuple[torch.nn.Module, torch.Tensor]:
    model_name, kwargs, size = CONFIGS[name]
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, **{**SMALL, **kwargs, **overrides})
    model.eval()
    # LayerScale starts at 1e-5 in DINOv2: give it weight so merging changes the output.
    for module in model.modules():
        if hasattr(module, "gamma") and isinstance(module.gamma, torch.nn.Parameter):
            with torch.no_grad():
                module.gamma.fill_(0.5)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def set_unfused(model: torch.nn.Module) -> None:
    for block in model.blocks:
        block.attn.fused_attn = False


def hooks_left(model: torch.nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
    ]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_r0_matches_unpatched(name):
    model, x = make(name)
    with torch.no_grad():
        ref = model(x)
        tome.patch(model, r=0)
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert model.tome.tokens_per_layer == [model.tome.tokens_per_layer[0]] * (len(model.blocks) + 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merging_counts_and_protected_tokens(name):
    model, x = make(name)
    tome.patch(model, r=4)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    handle = model.tome
    p = model.num_prefix_tokens
    assert handle.protected == p
    n0 = p + model.patch_embed.num_patches
    assert handle.tokens_per_layer == expected_counts(n0, [4] * len(model.blocks), p)
    assert handle.sizes.shape == (2, handle.tokens_per_layer[-1])
    assert (handle.sizes[:, :p] == 1).all()
    assert (handle.source[:, :p] == torch.arange(p)).all()
    assert (handle.sizes.sum(1) == n0).all()
    # the output differs from the unmerged model
    tome.unpatch(model)
    with torch.no_grad():
        assert not torch.allclose(model(x), out, atol=1e-4)


def test_unpatch_roundtrip_bit_identical():
    model, x = make("dinov2_registers")
    with torch.no_grad():
        ref = model(x)
        ref_features = model.forward_features(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tome.patch(model, r=4, unmerge_output=True)
    with torch.no_grad():
        model(x)
    assert hooks_left(model)  # something was patched
    assert tome.unpatch(model) is model
    assert "tome" not in model.__dict__ and not hasattr(model, "tome")
    assert hooks_left(model) == []
    assert "forward_features" not in model.__dict__ and "pool" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        assert torch.equal(model.forward_features(x), ref_features)
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)


def test_patch_twice_is_one_patch():
    model, x = make()
    tome.patch(model, r=4)
    hooks_once = sum(len(m._forward_hooks) for m in model.modules())
    tome.patch(model, r=2, prop_attn=False)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_once
    assert model.tome.r == 2 and not model.tome.prop_attn
    with torch.no_grad():
        model(x)
    assert model.tome.tokens_per_layer == expected_counts(17, [2, 2, 2], 1)
    tome.unpatch(model)
    assert hooks_left(model) == []


def test_r_settable_and_schedules():
    model, x = make()
    tome.patch(model, r=0)
    cases = [
        (4, [4, 4, 4]),
        ([6, 0, 2], [6, 0, 2]),
        ([3], [3, 0, 0]),
        ((4, -1.0), [8, 4, 0]),
        ((4, 0.0), [4, 4, 4]),
        (100, [100, 100, 100]),
    ]
    for r, per_layer in cases:
        model.tome.r = r
        assert model.tome.r == r
        with torch.no_grad():
            model(x)
        assert model.tome.tokens_per_layer == expected_counts(17, per_layer, 1), r
    with pytest.raises(ValueError):
        model.tome.r = -1
    with pytest.raises(ValueError):
        model.tome.r = [1, 2, 3, 4]  # more entries than layers


def test_avg_pool_is_size_weighted():
    model, x = make("avgpool_no_cls")
    tome.patch(model, r=4)
    with torch.no_grad():
        out = model(x)
        features = model.forward_features(x)  # merged tokens (unmerge_output=False)
        sizes = model.tome.sizes
        assert features.shape[1] == model.tome.tokens_per_layer[-1] < 16
        manual = model.head(model.fc_norm(model.tome.unmerge(features).mean(1)))
        weighted = (features * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True)
        manual_weighted = model.head(model.fc_norm(weighted))
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, manual_weighted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vit", "dinov2_registers"])
def test_unmerge_output_shapes(name):
    model, x = make(name)
    n0 = model.num_prefix_tokens + model.patch_embed.num_patches
    tome.patch(model, r=4, unmerge_output=True, unmerge_detail=False)  # plain copies
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, n0, 64)
        assert model.tome.tokens_per_layer[-1] < n0
        logits = model(x)
        assert logits.shape == (2, 10)
        # the unmerged tokens are copies of the merged ones: one value per group
        for b in range(2):
            assert len(torch.unique(features[b], dim=0)) == model.tome.tokens_per_layer[-1]
        model.tome.unmerge_output = False
        assert model.forward_features(x).shape == (2, model.tome.tokens_per_layer[-1], 64)
        torch.testing.assert_close(model(x), logits)


def test_fused_and_unfused_attention_agree():
    fused, x = make("qk_norm")
    unfused = copy.deepcopy(fused)
    set_unfused(unfused)
    assert all(not b.attn.fused_attn for b in unfused.blocks)
    for model in (fused, unfused):
        tome.patch(model, r=4)
    with torch.no_grad():
        a, b = fused(x), unfused(x)
    assert fused.tome.tokens_per_layer == unfused.tome.tokens_per_layer == [17, 13, 9, 5]
    assert torch.equal(fused.tome.source, unfused.tome.source)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unfused_r0_matches_unpatched():
    model, x = make("dinov2_layerscale")
    set_unfused(model)
    with torch.no_grad():
        ref = model(x)
        tome.patch(model, r=0)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_dynamic_img_size_two_resolutions():
    model, _ = make("vit", dynamic_img_size=True)
    inputs = {64: torch.randn(2, 3, 64, 64), 96: torch.randn(2, 3, 96, 96)}
    with torch.no_grad():
        refs = {size: model(x) for size, x in inputs.items()}
    tome.patch(model, r=4)
    for size, n0 in ((64, 17), (96, 37)):
        with torch.no_grad():
            model.tome.r = 4
            assert model(inputs[size]).shape == (2, 10)
            assert model.tome.tokens_per_layer == expected_counts(n0, [4, 4, 4], 1)
            model.tome.r = 0
            torch.testing.assert_close(model(inputs[size]), refs[size], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vit", "dinov2_registers"])
def test_training_backward(name):
    model, x = make(name, drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1)
    model.train()
    tome.patch(model, r=4)
    model(x).sum().backward()
    assert model.tome.tokens_per_layer == expected_counts(
        model.num_prefix_tokens + 16, [4, 4, 4], model.num_prefix_tokens
    )
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_grad_checkpointing_backward():
    model, x = make()
    reference = copy.deepcopy(model)
    for m in (model, reference):
        m.train()
        tome.patch(m, r=4)
    model.set_grad_checkpointing(True)
    x.requires_grad_(True)
    model(x).sum().backward()
    counts = model.tome.tokens_per_layer
    source = model.tome.source.clone()
    x2 = x.detach().clone().requires_grad_(True)
    reference(x2).sum().backward()
    assert counts == reference.tome.tokens_per_layer == [17, 13, 9, 5]
    assert torch.equal(source, reference.tome.source)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)


def test_batch_one():
    model, x = make("dinov2_registers")
    tome.patch(model, r=4)
    with torch.no_grad():
        single = model(x[:1])
        both = model(x)
    assert single.shape == (1, 10)
    assert model.tome.source.shape == (2, 21)
    # each sample merges on its own: batch 1 gives the same result as row 0 of batch 2
    torch.testing.assert_close(single, both[:1], atol=1e-5, rtol=1e-5)


def test_two_patched_models_independent():
    a, x = make("vit", seed=0)
    b, _ = make("dinov2_registers", seed=1)
    tome.patch(a, r=2)
    tome.patch(b, r=6)
    with torch.no_grad():
        a(x)
        b(torch.randn(2, 3, 56, 56))
        a(x)
    assert a.tome is not b.tome
    assert a.tome.tokens_per_layer == expected_counts(17, [2, 2, 2], 1)
    assert b.tome.tokens_per_layer == expected_counts(21, [6, 6, 6], 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    model, x = make("dinov2_registers")
    model.to(dtype)
    tome.patch(model, r=4, unmerge_output=True)
    with torch.no_grad():
        out = model(x.to(dtype))
        features = model.forward_features(x.to(dtype))
    assert out.dtype == dtype and features.dtype == dtype
    assert torch.isfinite(out).all()
    assert features.shape == (2, 21, 64)
    assert model.tome.sizes.dtype == torch.float32


def _compile_check(backend: str, recompile: bool) -> None:
    model, x = make("dinov2_registers", depth=2)
    tome.patch(model, r=4)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        out = compiled(x)
        counts, source = list(model.tome.tokens_per_layer), model.tome.source.clone()
        ref = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert counts == model.tome.tokens_per_layer == expected_counts(21, [4, 4], 5)
    assert torch.equal(source, model.tome.source)
    if recompile:
        # a new schedule is honoured (guards on r), not the one traced first
        model.tome.r = 2
        with torch.no_grad():
            out = compiled(x)
            assert model.tome.tokens_per_layer == expected_counts(21, [2, 2], 5)
            torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_aot_eager():
    torch._dynamo.reset()
    _compile_check("aot_eager", recompile=True)


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    _compile_check("inductor", recompile=False)


def test_schedule_asking_too_much_warns_once_and_caps():
    model, x = make()
    tome.patch(model, r=500)
    with (
        pytest.warns(UserWarning, match=r"asks block 0 to merge 500 of its 17 tokens.*merges 8"),
        torch.no_grad(),
    ):
        model(x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per schedule: the next pass is quiet
        with torch.no_grad():
            model(x)
    assert model.tome.tokens_per_layer == model.tome.planned_tokens(17) == expected_counts(17, [500] * 3, 1)
    model.tome.r = 2  # a new schedule is planned at once, before any pass
    assert model.tome.planned_tokens(17) == expected_counts(17, [2, 2, 2], 1)
    assert model.tome.tokens_per_layer == expected_counts(17, [500] * 3, 1)  # still the last pass's
