"""VideoMAE's ``temporal`` option (tome/core/temporal.py, transformers_vision.VisionHandle): tiny
random configs of the real transformers classes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import tome
from tome.core import merge as M
from tome.core import temporal as TM

transformers = pytest.importorskip("transformers")
_ = transformers.VideoMAEModel  # the lazy import here, not in the first test

# 8 frames, tubelet 2 -> T = 4 slices of 4 x 4 places: 64 tubelets.
T, H, W = 4, 4, 4
S = H * W
N0 = T * S


def _config(**overrides):
    return transformers.VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=8, tubelet_size=2, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=64, num_labels=5, **overrides,
    )  # fmt: skip


def _model(cls: str = "VideoMAEModel", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return getattr(transformers, cls)(_config(**overrides)).eval()


def _clip(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 8, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _run(model, x, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(x, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _groups(source: torch.Tensor) -> list[list[int]]:
    """The original tubelets of every merged token of one row."""
    return [torch.nonzero(source == j).flatten().tolist() for j in range(int(source.max()) + 1)]


def _thw(i: int) -> tuple[int, int, int]:
    return i // S, i % S // W, i % W


# -- off: nothing changes ------------------------------------------------------------------------


def test_off_is_the_default_matching_bit_for_bit():
    model, x = _model(), _clip()
    tome.patch(model, r=6)
    default = _run(model, x)
    assert model.tome.temporal is False
    tome.patch(model, r=6, temporal=False)
    assert torch.equal(_run(model, x), default)


def test_off_plans_are_bipartite_soft_matching():
    """Layer 0 with the option off merges exactly what tome's default matching plans."""
    model, x = _model(), _clip()
    keys = {}
    hook = model.encoder.layer[0].attention.attention.key.register_forward_hook(
        lambda m, a, out: keys.setdefault("k", out)
    )
    tome.patch(model, r=[6, 0, 0], temporal=False)
    _run(model, x)
    hook.remove()
    metric = model.tome.similarity_features(keys["k"].unflatten(-1, (2, 16)))
    plan = M.bipartite_soft_matching(metric, 6)
    assert torch.equal(model.tome.source, plan.index)


# -- on: the first merges pair the same place in adjacent slices -------------------------------


def test_on_merges_only_the_same_place_in_adjacent_slices():
    model, x = _model(), _clip()
    tome.patch(model, r=8, temporal=True)  # 3 layers x 8 = 24 <= 32 odd-slice tubelets: all temporal
    _run(model, x)
    assert model.tome.tokens_per_layer == [64, 56, 48, 40]
    for row in model.tome.source:
        for group in _groups(row):
            places = {_thw(i)[1:] for i in group}
            slices = sorted(_thw(i)[0] for i in group)
            assert len(places) == 1, group
            assert slices == list(range(slices[0], slices[0] + len(slices))), group  # adjacent
            # a group is one tubelet, or one even-slice tubelet with its odd neighbours
            assert len(group) == 1 or (len(group) <= 3 and sum(t % 2 == 0 for t in slices) == 1)


def test_the_phase_ends_at_the_odd_slices_then_the_default_matching():
    """r = 16: layers 0 and 1 remove the 32 odd-slice tubelets' worth; layer 2 merges by the
    default matching, with the same token counts as the option off."""
    assert [TM.in_temporal_phase(n, 16, N0, (T, H, W)) for n in (64, 48, 32)] == [True, True, False]
    model, x = _model(), _clip()
    tome.patch(model, r=[16, 16, 0], temporal=True)
    _run(model, x)
    counts = model.tome.tokens_per_layer
    for row in model.tome.source:
        groups = _groups(row)
        assert len(groups) == 32
        assert all(len({_thw(i)[1:] for i in g}) == 1 for g in groups)
    tome.patch(model, r=16, temporal=True)
    _run(model, x)
    on = model.tome.tokens_per_layer
    tome.patch(model, r=16, temporal=False)
    _run(model, x)
    assert on == model.tome.tokens_per_layer == [64, 48, 32, 16] and counts == [64, 48, 32, 32]


def test_window_merges_within_three_by_three_places():
    model, x = _model(), _clip()
    tome.patch(model, r=8, temporal="window")
    _run(model, x)
    for row in model.tome.source:
        for group in _groups(row):
            even = [_thw(i) for i in group if _thw(i)[0] % 2 == 0]
            if len(group) == 1:
                continue
            assert len(even) == 1  # one even-slice tubelet receives
            t0, h0, w0 = even[0]
            for i in group:
                t, h, w = _thw(i)
                assert abs(t - t0) <= 1 and abs(h - h0) <= 1 and abs(w - w0) <= 1


def test_still_clip_merges_exactly_with_the_option_and_not_without():
    """Identical slices (position table zeroed, so tubelets at one place are equal): the temporal
    merges fold exact copies together, and proportional attention keeps the output exact."""
    model = _model()
    model.embeddings.position_embeddings = torch.zeros_like(model.embeddings.position_embeddings)
    frame = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    x = frame.expand(1, 8, 3, 32, 32).contiguous()
    exact = _run(model, x)
    tome.patch(model, r=[32, 0, 0], temporal=True, unmerge_output=True)
    assert torch.allclose(_run(model, x), exact, atol=1e-5)
    tome.patch(model, r=[32, 0, 0], temporal=False, unmerge_output=True)
    assert not torch.allclose(_run(model, x), exact, atol=1e-3)


def test_sizes_are_counts_and_means_are_size_weighted():
    model, x = _model(), _clip(batch=1)
    tome.patch(model, r=8, temporal=True, unmerge_output=False)
    merged = _run(model, x)
    assert model.tome.sizes.sum().item() == N0
    assert merged.shape[1] == 40


def test_classifier_with_the_option():
    model, x = _model("VideoMAEForVideoClassification"), _clip()
    exact = _run(model, x)
    tome.patch(model, r=8, temporal=True)
    out = _run(model, x)
    assert out.shape == exact.shape and torch.isfinite(out).all() and not torch.equal(out, exact)
    tome.unpatch(model)
    assert torch.equal(_run(model, x), exact)


def test_visible_tubelets_only_fall_back_to_the_default_matching():
    """bool_masked_pos drops tubelets: no full grid, so the default matching (documented)."""
    model, x = _model(), _clip()
    mask = torch.zeros(2, N0, dtype=torch.bool)
    mask[:, ::4] = True
    tome.patch(model, r=6, temporal=False)
    off = _run(model, x, bool_masked_pos=mask)
    tome.patch(model, r=6, temporal=True)
    assert torch.equal(_run(model, x, bool_masked_pos=mask), off)


def test_keep_outliers_with_the_option():
    model, x = _model(), _clip()
    tome.patch(model, r=8, temporal=True, keep_outliers=2)
    assert torch.isfinite(_run(model, x)).all()


# -- the contract: unpatch, copies, settable -----------------------------------------------------


def test_unpatch_is_bit_identical():
    model, x = _model(), _clip()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    exact = _run(model, x)
    tome.patch(model, r=8, temporal=True)
    assert not torch.equal(_run(model, x), exact)
    tome.unpatch(model)
    assert torch.equal(_run(model, x), exact)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_option(how):
    model, x = _model(), _clip()
    tome.patch(model, r=8, temporal="window")
    merged = _run(model, x)
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert twin.tome.temporal == "window" and twin.tome.video_grid == (T, H, W)
    assert torch.equal(_run(twin, x), merged)


def test_option_is_settable_and_a_patch_option():
    model, x = _model(), _clip()
    tome.patch(model, r=8)
    model.tome.temporal = True
    on = _run(model, x)
    assert model.tome.patch_options()["temporal"] is True
    tome.patch(model, **model.tome.patch_options())
    assert torch.equal(_run(model, x), on)


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 0, "yes", None, 3])
def test_bad_values_are_refused(value):
    model = _model()
    with pytest.raises(ValueError, match=r"temporal: expected False, True .* or 'window'"):
        tome.patch(model, r=4, temporal=value)
    assert "tome" not in model.__dict__
    tome.patch(model, r=4)
    with pytest.raises(ValueError, match="temporal: expected"):
        model.tome.temporal = value


def test_image_models_refuse_the_option():
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    with pytest.raises(ValueError, match=r"temporal: .*video encoder \(VideoMAE\); ViTModel reads images"):
        tome.patch(vit, r=1, temporal=True)
    tome.patch(vit, r=1)
    assert vit.tome.temporal is False
    with pytest.raises(ValueError, match="ViTModel reads images"):
        vit.tome.temporal = "window"


def test_other_libraries_refuse_the_keyword():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32)
    with pytest.raises(TypeError, match="temporal: an option of transformers"):
        tome.patch(model, r=1, temporal=True)


def test_core_checks():
    with pytest.raises(ValueError, match="window: expected one of 1, 3, got 2"):
        TM.temporal_partners((T, H, W), window=2)
    with pytest.raises(ValueError, match="grid: 4 x 4 x 4 = 64 tubelets, but the pass started with 60"):
        TM.temporal_soft_matching(torch.randn(1, 60, 8), 4, None, (T, H, W))
    assert TM.temporal_capacity((1, H, W)) == 0
    assert not TM.in_temporal_phase(16, 4, 16, (1, 4, 4))  # one slice: nothing temporal


def test_core_plan_is_a_valid_chain():
    """Chained temporal plans: sizes are counts, every move goes from an odd slice."""
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, N0, 8, generator=g)
    history = M.start_history(2, N0)
    for _ in range(4):
        n = history.num_tokens
        assert TM.in_temporal_phase(n, 8, N0, (T, H, W))
        current = torch.randn(2, n, 8, generator=g)
        plan = TM.temporal_soft_matching(current, 8, history, (T, H, W))
        assert (plan.in_sizes.gather(1, plan.src) == 1).all()
        history = M.advance(history, plan)
    assert history.num_tokens == N0 - 32 and (history.sizes.sum(1) == N0).all()
    assert not TM.in_temporal_phase(history.num_tokens, 1, N0, (T, H, W))
    del metric
