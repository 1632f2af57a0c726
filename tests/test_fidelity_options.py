"""The fidelity options of tome.patch (metric, energy, unmerge_detail, mode, size_penalty,
keep_outliers) on tiny random timm and transformers models: shapes, r=0 exactness, invariants."""

from __future__ import annotations

import pytest
import torch

import tome
from tome import merge as M

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

OPTIONS = {
    "metric_x": {"metric": "x"},
    "energy": {"energy": True},
    "energy_pool4": {"energy": 4.0},
    "detail": {"unmerge_detail": True},
    "mlerp": {"mode": "mlerp"},
    "size_penalty": {"size_penalty": 0.05},
    "keep_outliers": {"keep_outliers": 3},
    "all": {"metric": "x", "energy": True, "unmerge_detail": True, "mode": "mlerp", "size_penalty": 0.05,
            "keep_outliers": 2},
}  # fmt: skip


def timm_model(depth: int = 3, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, embed_dim=64, num_heads=2, depth=depth,
        num_classes=0,
    ).eval()  # fmt: skip
    for module in model.modules():
        if hasattr(module, "gamma") and isinstance(module.gamma, torch.nn.Parameter):
            with torch.no_grad():
                module.gamma.fill_(0.5)
    return model, torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(seed + 1))


def hf_model(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=48, patch_size=8,
        layerscale_value=0.5,
    )  # fmt: skip
    model = transformers.Dinov2Model(config).eval()
    return model, torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(seed + 1))


def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if "transformers" in type(model).__module__:
            return model(pixel_values=x).last_hidden_state
        return model.forward_features(x)


@pytest.mark.parametrize("family", ["timm", "transformers"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_r0_exact_shapes_and_round_trip(family, name):
    model, x = timm_model() if family == "timm" else hf_model()
    ref = run(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tome.patch(model, r=0, **OPTIONS[name])
    torch.testing.assert_close(run(model, x), ref, atol=1e-5, rtol=1e-5)
    model.tome.r = 4
    out = run(model, x)
    n0 = ref.shape[1]
    merged = n0 - 3 * 4
    assert model.tome.tokens_per_layer == [n0, n0 - 4, n0 - 8, merged]
    full = OPTIONS[name].get("unmerge_detail", False)
    assert out.shape == (2, n0 if full else merged, ref.shape[2])
    assert torch.isfinite(out).all()
    assert model.tome.sizes.sum(1).tolist() == [float(n0)] * 2
    assert model.tome.unmerge(out).shape == ref.shape
    assert not torch.allclose(out[:, :1], ref[:, :1])  # something was merged
    for key, value in OPTIONS[name].items():
        assert getattr(model.tome, key) == value
    tome.unpatch(model)
    assert torch.equal(run(model, x), ref)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_defaults_are_tome():
    model, x = timm_model()
    tome.patch(model, r=4)
    default = run(model, x)
    tome.patch(model, r=4, metric="keys", energy=False, unmerge_detail=False, mode="mean", size_penalty=0.0,
               keep_outliers=0)  # fmt: skip
    assert torch.equal(run(model, x), default)


def test_metric_x_changes_the_merges_and_skips_keys():
    model, x = timm_model()
    tome.patch(model, r=6)
    run(model, x)
    keys_source = model.tome.source.clone()
    tome.patch(model, r=6, metric="x")
    run(model, x)
    assert not torch.equal(model.tome.source, keys_source)


def test_patch_twice_keeps_the_new_options_and_bad_options_raise():
    model, _ = timm_model()
    tome.patch(model, r=4, mode="mlerp", keep_outliers=2)
    with pytest.raises(ValueError, match="metric"):
        tome.patch(model, r=4, metric="queries")
    # the earlier patch is still in place, with its options
    assert model.tome.mode == "mlerp" and model.tome.keep_outliers == 2
    for bad in ({"energy": 1.5}, {"mode": "max"}, {"size_penalty": -1}, {"keep_outliers": -1},
                {"keep_outliers": 1.5}):  # fmt: skip
        with pytest.raises(ValueError):
            tome.patch(model, r=4, **bad)
    tome.unpatch(model)
    assert "tome" not in model.__dict__


def test_unmerge_detail_keeps_the_group_means():
    """With the final norm removed, the detail tokens average (over each final group, size-
    weighted) to exactly the merged tokens: the detail only redistributes within groups."""
    model, x = timm_model()
    model.norm = torch.nn.Identity()
    tome.patch(model, r=5)
    merged = run(model, x)
    tome.patch(model, r=5, unmerge_detail=True)
    full = run(model, x)
    assert full.shape[1] == model.tome.source.shape[1]
    assert full.shape[1] > merged.shape[1]
    torch.testing.assert_close(M.merge_original(model.tome.history, full), merged, atol=1e-4, rtol=1e-4)
    # and the originals within a group now differ
    assert not torch.allclose(full, model.tome.unmerge(merged))
    # the pooled (class token) output does not change
    torch.testing.assert_close(full[:, 0], merged[:, 0])


def test_keep_outliers_never_merges_the_largest_tokens():
    torch.manual_seed(0)
    x = torch.randn(3, 21, 8)
    x[:, 7] *= 50  # outliers
    x[:, 12] *= 40
    bias = M.outlier_bias(x, 2, protected=1)
    assert bias[:, 7].eq(-4).all() and bias[:, 12].eq(-4).all() and bias.eq(-4).sum() == 6
    plan = M.bipartite_soft_matching(x, 8, protected=1, token_bias=bias)
    moved = torch.cat([plan.src, plan.kept.gather(1, plan.dst)], dim=1)
    assert not (moved == 7).any() and not (moved == 12).any()


def test_energy_merges_only_the_redundant_tokens():
    torch.manual_seed(0)
    metric = torch.randn(2, 1, 8).expand(2, 17, 8).clone() + 0.05 * torch.randn(2, 17, 8)
    metric[:, 3] = torch.randn(2, 8)  # isolated tokens: low energy
    metric[:, 10] = torch.randn(2, 8)
    energy = M.energy_score(metric, protected=1)
    assert energy.shape == (2, 17) and torch.equal(energy[:, 0], torch.ones(2))
    assert (energy[:, 3] < energy[:, 5]).all() and (energy[:, 10] < energy[:, 5]).all()
    bias = M.isolation_bias(energy, 4, protected=1)
    assert bias[:, 3].eq(-4).all() and bias[:, 10].eq(-4).all()
    plan = M.bipartite_soft_matching(metric, 4, protected=1, token_bias=bias)
    moved = torch.cat([plan.src, plan.kept.gather(1, plan.dst)], dim=1)
    assert not (moved == 3).any() and not (moved == 10).any()


def test_token_bias_none_and_zero_are_plain_tome():
    metric = torch.randn(2, 33, 8)
    plain = M.bipartite_soft_matching(metric, 10, protected=1)
    zero = M.bipartite_soft_matching(metric, 10, protected=1, token_bias=torch.zeros(2, 33))
    assert torch.equal(plain.index, zero.index) and torch.equal(plain.sizes, zero.sizes)


def test_compile_fullgraph_with_options():
    torch._dynamo.reset()
    model, x = timm_model(depth=2)
    tome.patch(model, r=4, **OPTIONS["all"])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
