"""``tome.tune`` and ``from_module`` on wrapped models, as ``tome.patch`` takes them:
``torch.compile(m)``, ``nn.DataParallel(m)``, ``DistributedDataParallel(m)`` and a user's module
holding a supported model (the model inside is tuned); several supported models: a clear error.
Tiny random timm models."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn as nn

import tome
from tome.tools.models.vision import find_model, from_module

timm = pytest.importorskip("timm")

FAST = dict(budget="flops", progress=False, max_evals=12)
WRAPS = ("compile", "DataParallel", "DistributedDataParallel", "container")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _timm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4).eval()


def _pixels(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=WRAPS)
def wrapped(request, tmp_path) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """``(kind, wrapper, the model inside)``."""
    inner = _timm()
    kind = request.param
    if kind == "compile":
        wrapper = torch.compile(inner, backend="eager")
    elif kind == "DataParallel":
        wrapper = nn.DataParallel(inner)
    elif kind == "DistributedDataParallel":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
        wrapper = nn.parallel.DistributedDataParallel(inner)
    else:
        wrapper = nn.Sequential(nn.Identity(), nn.ModuleDict({"vit": inner}))
    try:
        yield kind, wrapper, inner
    finally:
        if kind == "DistributedDataParallel":
            dist.destroy_process_group()


def _untouched(module: nn.Module) -> bool:
    return not any("tome" in m.__dict__ or m._forward_hooks for m in module.modules())


def test_from_module_wraps_the_model_inside(wrapped):
    kind, wrapper, inner = wrapped
    name, found = find_model(wrapper)
    assert found is inner
    assert name == {"compile": "_orig_mod", "container": "1.vit"}.get(kind, "module")
    model = from_module(wrapper)
    assert model.module is inner and model.container is wrapper
    assert (model.family, model.img_size, model.name) == ("timm", 64, "VisionTransformer")
    assert from_module(inner).container is None
    out = model(_pixels(2))
    assert out.patches.shape == (2, 16, 192)


def test_tune_on_a_wrapper_equals_tune_on_the_model_and_restores_it(wrapped):
    _, wrapper, inner = wrapped
    pixels = _pixels()
    with torch.no_grad():
        reference = inner(pixels)
    result = tome.tune(wrapper, pixels, 1.5, **FAST)
    assert result.schedule == tome.tune(_timm(), pixels, 1.5, **FAST).schedule
    assert result.flops_speedup >= 1.5
    assert _untouched(wrapper)
    with torch.no_grad():
        assert torch.equal(inner(pixels), reference)


def test_tune_apply_on_a_wrapper_patches_through_it(wrapped):
    kind, wrapper, inner = wrapped
    pixels = _pixels()
    with torch.no_grad():
        reference = inner(pixels)
    result = tome.tune(wrapper, pixels, 1.5, apply=True, **FAST)
    assert isinstance(wrapper.tome, tome.PatchedModels) and inner.tome.r == result.schedule
    run = inner if kind == "container" else wrapper
    with torch.no_grad():
        run(pixels)  # a compiled wrapper recompiles: it runs the patched model, no stale graph
    assert inner.tome.tokens_per_layer == result.tokens
    tome.unpatch(wrapper)  # undoes all of it
    assert _untouched(wrapper)
    with torch.no_grad():
        assert torch.equal(inner(pixels), reference)


def test_tune_keeps_a_patched_wrapper_as_it_was():
    inner = _timm()
    wrapper = nn.DataParallel(inner)
    tome.patch(wrapper, r=2, prop_attn=False)
    tome.tune(wrapper, _pixels(), 1.5, **FAST)
    assert isinstance(wrapper.tome, tome.PatchedModels) and inner.tome.r == 2
    assert inner.tome.prop_attn is False
    result = tome.tune(wrapper, _pixels(), 1.5, apply=True, **FAST)
    assert wrapper.tome.r == result.schedule and inner.tome.prop_attn is False
    tome.unpatch(wrapper)
    assert _untouched(wrapper)


def test_tune_keeps_a_ratio_schedule():
    model = tome.patch(_timm(), ratio=0.2)
    tome.tune(model, _pixels(), 1.5, **FAST)
    assert model.tome.ratio == 0.2 and model.tome.r is None


def test_several_supported_models_inside_is_a_clear_error():
    both = nn.ModuleDict({"a": _timm(0), "b": _timm(1)})
    message = r"holds 2 supported models \(a \(VisionTransformer\), b \(VisionTransformer\)\); expected one"
    with pytest.raises(ValueError, match=message + r".*e\.g\. model\.a"):
        from_module(both)
    with pytest.raises(ValueError, match=message):
        tome.tune(both, _pixels(), 1.5, **FAST)
    assert _untouched(both)
    assert tome.tune(both["a"], _pixels(), 1.5, **FAST).flops_speedup >= 1.5  # the one you mean


def test_nested_supported_models_count_once():
    """The outermost supported model is the one (a model holding another is not 'several')."""
    outer = _timm()
    outer.extra = nn.ModuleDict({"inner": _timm(1)})  # a supported model inside the supported one
    holder = nn.Sequential(outer)
    assert find_model(holder) == ("0", outer)


def test_nothing_supported_inside_says_what_was_searched():
    with pytest.raises(TypeError, match=r"none of its 2 submodules is a supported model.*outermost first"):
        from_module(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(
        TypeError, match=r"do not support torch\.nn\.modules\.linear\.Linear.*supported model classes"
    ):
        tome.tune(nn.Linear(3, 3), _pixels(), 1.5, **FAST)
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module, got str"):
        find_model("vit")


def test_a_framework_model_tome_does_not_support_is_not_searched():
    """A framework's own unsupported model (here a masked-image-modeling head, which needs every
    token) is refused, not tuned through its backbone: as tome.patch does."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8,
    )  # fmt: skip
    masked = transformers.ViTForMaskedImageModeling(config)
    with pytest.raises(
        TypeError,
        match=r"tome\.tune and the tome command \(vision transformers\) do not support transformers\..*ViTForMaskedImageModeling",
    ):
        from_module(masked)
    with pytest.raises(TypeError, match="supported model classes"):
        tome.tune(masked, torch.randn(8, 3, 32, 32), 1.5, **FAST)
    # a text encoder (tome.patch merges it; the tools run vision transformers)
    bert = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
        )
    )
    with pytest.raises(TypeError, match=r"vision transformers\) do not support transformers\..*BertModel"):
        from_module(bert)
