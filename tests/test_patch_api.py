"""tome.patch / tome.unpatch: errors, no-op unpatch, lazy framework imports."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch.nn as nn

import tome


def test_unsupported_module_raises_type_error_listing_families():
    model = nn.Linear(4, 4)
    with pytest.raises(TypeError) as info:
        tome.patch(model, r=4)
    message = str(info.value)
    assert "torch.nn.modules.linear.Linear" in message
    for family in ("timm", "transformers", "torchvision"):
        assert family in message
    assert "VisionTransformer" in message
    assert not hasattr(model, "tome")


def test_torchvision_resnet_is_unsupported():
    models = pytest.importorskip("torchvision.models")
    model = models.resnet18(weights=None)
    with pytest.raises(TypeError, match="Supported model classes"):
        tome.patch(model)
    assert not hasattr(model, "tome")


def test_not_a_module():
    with pytest.raises(TypeError, match="Module"):
        tome.patch("vit_b_16", r=4)


def _tiny_vit() -> nn.Module:
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    return tv.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


@pytest.mark.parametrize(
    ("r", "error"),
    [
        (-1, ValueError),
        ([1, -2], ValueError),
        ([1, 1.5], ValueError),
        ((4, 2.0), ValueError),
        ((-4, 0.0), ValueError),
        ("16", TypeError),
        (2.5, TypeError),
        ([1, 1, 1], ValueError),  # more entries than the model has layers
    ],
)
def test_bad_r_raises(r, error):
    model = _tiny_vit()
    with pytest.raises(error):
        tome.patch(model, r=r)
    assert not hasattr(model, "tome")


def test_default_schedule_and_ratio():
    model = tome.patch(_tiny_vit())
    assert model.tome.r == 16 and model.tome.ratio is None
    tome.patch(model, ratio=0.25)
    assert model.tome.ratio == 0.25 and model.tome.r is None
    assert model.tome.planned_tokens(17) == [17, 13, 10]  # 25% of the 16, then of the 12 mergeable
    model.tome.r = 2
    assert model.tome.ratio is None and model.tome.planned_tokens(17) == [17, 15, 13]
    assert tome.patch(model, **model.tome.patch_options()).tome.r == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ratio": 1.0}, ValueError, "0 <= ratio < 1"),
        ({"ratio": -0.1}, ValueError, "0 <= ratio < 1"),
        ({"ratio": "0.2"}, TypeError, "ratio"),
        ({"ratio": 0.2, "r": 4}, ValueError, "not both"),
    ],
)
def test_bad_ratio_raises(kwargs, error, match):
    model = _tiny_vit()
    with pytest.raises(error, match=match):
        tome.patch(model, **kwargs)
    assert not hasattr(model, "tome")


def test_bad_r_on_handle_keeps_old_value():
    model = tome.patch(_tiny_vit(), r=2)
    with pytest.raises(ValueError):
        model.tome.r = -3
    assert model.tome.r == 2
    tome.unpatch(model)


def test_unpatch_unpatched_is_noop():
    model = _tiny_vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert tome.unpatch(model) is model
    assert tome.unpatch(nn.Linear(2, 2)) is not None
    assert not hasattr(model, "tome")
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in model.modules())
    after = model.state_dict()
    assert all((after[k] == state[k]).all() for k in state)


def test_unpatch_not_a_module():
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module, got str"):
        tome.unpatch("vit_b_16")


@pytest.mark.parametrize("name", ["prop_attn", "unmerge_output"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_flags_must_be_bools(name, value):
    model = _tiny_vit()
    if value is not None or name != "unmerge_output":  # unmerge_output=None: the family's default
        with pytest.raises(TypeError, match=f"{name}: expected True or False"):
            tome.patch(model, r=2, **{name: value})
        assert not hasattr(model, "tome")
    tome.patch(model, r=2)
    with pytest.raises(TypeError, match=name):
        setattr(model.tome, name, value)
    assert getattr(model.tome, name) is (name == "prop_attn")
    tome.unpatch(model)


def test_a_two_tuple_is_a_ramp_with_a_hint():
    with pytest.raises(ValueError, match="pass a list for one r per layer"):
        tome.patch(_tiny_vit(), r=(8, 4))


def test_unpatch_twice_is_noop():
    model = tome.patch(_tiny_vit(), r=2)
    tome.unpatch(model)
    tome.unpatch(model)
    assert not hasattr(model, "tome")


def test_patch_returns_model():
    model = _tiny_vit()
    assert tome.patch(model, r=2) is model
    assert isinstance(model.tome, tome.ToMeHandle)
    assert "torchvision" in repr(model.tome)


def test_import_tome_imports_no_framework():
    code = textwrap.dedent(
        """
        import sys
        import tome
        import tome.runtime.patching
        frameworks = ("timm", "transformers", "torchvision", "open_clip", "diffusers")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in frameworks)
        print(",".join(loaded))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"import tome imported: {result.stdout.strip()}"


# -- wrapped models --------------------------------------------------------------------------------


def _tiny_timm(seed: int = 0) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
        num_classes=5,
    ).eval()  # fmt: skip


def _no_patch_left(model: nn.Module) -> bool:
    # (torch.compile's wrapper keeps its own compiled forward in its __dict__)
    return not any(
        "tome" in m.__dict__
        or ("forward" in m.__dict__ and type(m).__name__ != "OptimizedModule")
        or "__prepare_scriptable__" in m.__dict__
        or m._forward_hooks
        for m in model.modules()
    )


@pytest.mark.parametrize("wrap", ["compile", "DataParallel", "DistributedDataParallel", "container"])
def test_wrapped_model_is_patched_inside_and_unpatched_whole(wrap, tmp_path):
    import torch

    inner = _tiny_timm()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = inner(x)
    if wrap == "compile":
        wrapper = torch.compile(inner, backend="eager")
    elif wrap == "DataParallel":
        wrapper = nn.DataParallel(inner)
    elif wrap == "DistributedDataParallel":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
        wrapper = nn.parallel.DistributedDataParallel(inner)
    else:
        wrapper = nn.Sequential(nn.Identity(), nn.ModuleDict({"vit": inner}))
    try:
        assert tome.patch(wrapper, r=3) is wrapper
        assert isinstance(wrapper.tome, tome.PatchedModels)
        assert isinstance(inner.tome, tome.ToMeHandle)
        run = wrapper if wrap != "container" else inner
        with torch.no_grad():
            merged = run(x)
        assert wrapper.tome.tokens_per_layer == [17, 14, 11, 8]
        assert not torch.allclose(merged, reference, atol=1e-4)
        wrapper.tome.r = 0  # settings reach the model inside
        assert inner.tome.r == 0
        with torch.no_grad():
            torch.testing.assert_close(run(x), reference, atol=1e-5, rtol=1e-5)
        assert tome.unpatch(wrapper) is wrapper
        assert _no_patch_left(wrapper)
        with torch.no_grad():
            assert torch.equal(inner(x), reference)
    finally:
        if wrap == "DistributedDataParallel":
            dist.destroy_process_group()


def test_compiled_before_patching_does_not_run_a_stale_graph():
    import torch

    model = _tiny_timm()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = compiled(x)
        tome.patch(compiled, r=3)
        after = compiled(x)
        torch.testing.assert_close(after, model(x))
        assert model.tome.tokens_per_layer == [17, 14, 11, 8]
        assert not torch.allclose(before, after, atol=1e-4)
        tome.unpatch(compiled)
        assert torch.equal(compiled(x), before)


def test_container_with_two_models_patches_both():
    both = nn.ModuleDict({"a": _tiny_timm(0), "b": _tiny_timm(1)})
    tome.patch(both, r=2)
    assert set(both.tome.handles) == {"a", "b"}
    assert both.tome.r == 2
    both.tome.r = 3
    assert both["a"].tome.r == both["b"].tome.r == 3
    with pytest.raises(AttributeError, match="2 models are patched"):
        _ = both.tome.source
    tome.unpatch(both)
    assert _no_patch_left(both)


def test_nothing_supported_inside_says_what_was_searched():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(TypeError, match=r"none of its 2 submodules is a supported model.*outermost first"):
        tome.patch(model)
