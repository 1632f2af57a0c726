"""The merging options of tome.patch (metric, mode, unmerge_detail, keep_outliers) on tiny random
timm, transformers and torchvision models: shapes, r=0 exactness, invariants."""

from __future__ import annotations

import pytest
import torch

import tome
from tome.core import merge as M

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

ORIGINAL = {"metric": "keys", "mode": "mean", "unmerge_detail": False}  # ToMe as published
DENSE = {"metric": "head_keys", "unmerge_detail": True, "unmerge_output": True}
OPTIONS = {
    "defaults": {},
    "original": ORIGINAL,
    "keys": {"metric": "keys"},
    "mean": {"mode": "mean"},
    "head_keys": {"metric": "head_keys"},
    "detail": {"unmerge_detail": True},
    "dense": DENSE,
    "keep_outliers": {"keep_outliers": 3},
    "unmerged_output": {"unmerge_output": True},
    "original_unmerged": {**ORIGINAL, "unmerge_output": True},
    "all": {**DENSE, "keep_outliers": 2},
}


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
    full = OPTIONS[name].get("unmerge_output", False)
    assert out.shape == (2, n0 if full else merged, ref.shape[2])
    assert torch.isfinite(out).all()
    assert model.tome.sizes.sum(1).tolist() == [float(n0)] * 2
    assert model.tome.unmerge(out).shape == ref.shape
    assert not torch.allclose(out[:, :1], ref[:, :1])  # something was merged
    for key, value in OPTIONS[name].items():
        assert model.tome.patch_options()[key] == value
    tome.unpatch(model)
    assert torch.equal(run(model, x), ref)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_defaults_and_patch_options():
    model, x = timm_model()
    tome.patch(model, r=4)
    assert model.tome.options == tome.MergeOptions()
    assert model.tome.patch_options() == {
        "r": 4, "prop_attn": True, "unmerge_output": False, "metric": "keys", "mode": "mlerp",
        "unmerge_detail": False, "keep_outliers": 0, "attention_kernel": "sdpa",
    }  # fmt: skip
    default = run(model, x)
    tome.patch(model, r=4, metric="keys", mode="mlerp", unmerge_detail=False, keep_outliers=0)
    assert torch.equal(run(model, x), default)
    tome.patch(model, r=4, **ORIGINAL)
    assert not torch.equal(run(model, x), default)


def test_head_keys_weigh_every_head_equally():
    """One head with huge keys decides ``keys`` (their mean over heads) but not ``head_keys``."""
    torch.manual_seed(0)
    keys = torch.randn(2, 9, 3, 4)
    keys[:, :, 0] *= 1000
    mean = tome.MergeOptions(metric="keys").similarity_features(keys)
    per_head = tome.MergeOptions(metric="head_keys").similarity_features(keys)
    assert mean.shape == (2, 9, 4) and per_head.shape == (2, 9, 12)
    cos = per_head @ per_head.transpose(1, 2) / 3  # mean over heads of the per-head cosines
    expected = torch.nn.functional.cosine_similarity(keys[:, :, None], keys[:, None, :], dim=-1).mean(-1)
    torch.testing.assert_close(cos, expected, atol=1e-5, rtol=1e-5)
    # with metric="keys", head 0 alone decides
    torch.testing.assert_close(M.best_edges(mean, 0)[1], M.best_edges(keys[:, :, 0], 0)[1])


def test_metric_changes_the_merges():
    model, x = timm_model()
    tome.patch(model, r=6, metric="keys")
    run(model, x)
    keys_source = model.tome.source.clone()
    tome.patch(model, r=6, metric="head_keys")
    run(model, x)
    assert not torch.equal(model.tome.source, keys_source)


def test_patch_twice_keeps_the_new_options_and_bad_options_raise():
    model, _ = timm_model()
    tome.patch(model, r=4, mode="mean", keep_outliers=2)
    with pytest.raises(ValueError, match="metric"):
        tome.patch(model, r=4, metric="queries")
    # the earlier patch is still in place, with its options
    assert model.tome.options.mode == "mean" and model.tome.options.keep_outliers == 2
    for bad in ({"mode": "max"}, {"keep_outliers": -1}, {"keep_outliers": 1.5}, {"metric": "x"}):
        with pytest.raises(ValueError):
            tome.patch(model, r=4, **bad)
    with pytest.raises(TypeError, match="unmerge_detail"):
        tome.patch(model, r=4, unmerge_detail="yes")
    tome.unpatch(model)
    assert "tome" not in model.__dict__


@pytest.mark.parametrize("family", ["timm", "transformers", "torchvision"])
def test_unmerge_detail_only_with_unmerged_output(family):
    """``unmerge_detail`` changes only what ``unmerge_output`` returns, and only within groups."""
    if family == "torchvision":
        torchvision = pytest.importorskip("torchvision")
        torch.manual_seed(0)
        model = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
        ).eval()
        x = torch.randn(2, 3, 32, 32)
        model.encoder.ln = torch.nn.Identity()

        def forward(m):
            with torch.no_grad():
                patches = m._process_input(x)
                return m.encoder(torch.cat([m.class_token.expand(2, -1, -1), patches], dim=1))

    else:
        model, x = timm_model() if family == "timm" else hf_model()
        if family == "timm":
            model.norm = torch.nn.Identity()
        else:
            model.layernorm = torch.nn.Identity()

        def forward(m):
            return run(m, x)

    tome.patch(model, r=5, unmerge_output=True, unmerge_detail=False, mode="mean")
    plain = forward(model)
    tome.patch(model, r=5, unmerge_output=False, unmerge_detail=True, mode="mean")
    merged = forward(model)
    torch.testing.assert_close(model.tome.unmerge(merged), plain)
    tome.patch(model, r=5, unmerge_output=True, unmerge_detail=True, mode="mean")
    full = forward(model)
    assert full.shape[1] == model.tome.source.shape[1] > merged.shape[1]
    # mean mode: the detail tokens average (size-weighted, over each final group) to exactly the
    # merged tokens: the detail only redistributes within groups
    torch.testing.assert_close(M.merge_original(model.tome.history, full), merged, atol=1e-4, rtol=1e-4)
    assert full.shape == plain.shape
    # and the originals within a group now differ
    assert not torch.allclose(full, plain)
    # the class token does not change
    torch.testing.assert_close(full[:, 0], merged[:, 0])


@pytest.mark.parametrize("mode", ["mean", "mlerp"])
def test_sparse_residuals_carried_back_equal_the_dense_sum(mode):
    """unmerge_detail keeps only the rows a merge changed, then carries the sums back from the
    last block: the same as summing every block's dense residuals in original-token order."""
    torch.manual_seed(0)
    x = torch.randn(3, 17, 5)
    history = M.start_history(3, 17)
    dense = torch.zeros(3, 17, 5)
    entries = []
    for r in (4, 3, 0, 2):
        plan = M.bipartite_soft_matching(torch.randn(3, x.shape[1], 6), r, history, protected=1)
        merged = M.merge(plan, x, mode)
        dense += M.unmerge(history.source, x - M.unmerge(plan.index, merged))
        if r:
            entries.append((*M.merge_residuals(plan, x, merged), plan.index))
        history, x = M.advance(history, plan), merged
    total = None
    for rows, residuals, index in reversed(entries):
        total = residuals.new_zeros(3, index.shape[1], 5) if total is None else M.unmerge(index, total)
        total = M.add_rows(total, rows, residuals)
    torch.testing.assert_close(total, dense)


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
