"""Compiled and bf16 patched models, family by family (tiny random configs, one shape each).

- ``torch.compile(patched, fullgraph=True)`` equals the eager patched model for every family in
  :data:`FAMILIES` whose entry in :data:`NOT_FULLGRAPH` is absent (those listed there would say
  why Dynamo cannot capture them whole, and compile with graph breaks to the same output).
  Backend ``aot_eager`` (Dynamo's capture plus AOTAutograd's functionalization and
  decompositions, without inductor's code generation): whether a patched model compiles whole is
  decided there, in seconds; ``inductor`` itself runs on the transformers DINOv2 path here and on
  timm's in test_patch_timm.py (the paths ``benchmarks/compiled.py`` times). Tolerances: 1e-5
  (absolute and relative) for ``aot_eager``, whose decompositions may reorder float sums; 1e-4
  for inductor, whose fused kernels reorder more.
- bf16: with nothing merging (``r=0`` / ``ratio=0``) the patched model under ``.to(bfloat16)``
  and under CPU autocast gives the unpatched bf16 model's output bit for bit, except the
  families of :data:`BF16_REROUNDED` (another attention route: no further from the fp32 output
  than the unpatched bf16 model is, and within 2% of the output's largest magnitude of it);
  merging runs in bf16 without dtype errors, to the fp32 output's shape and finite values.

See docs/compiled.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import tome

# Families that Dynamo cannot capture whole, and why (docs/compiled.md): none of FAMILIES now.
# (The diffusers ones could not until their installed forwards took the class's forward bound at
# patch time: diffusers marks BasicTransformerBlock and Attention torch._dynamo.allow_in_graph,
# and Dynamo cannot trace type(module).forward on such a class.)
NOT_FULLGRAPH: dict[str, str] = {}
# Families whose r=0 bf16 output is not bit-identical to the unpatched bf16 model: their
# nn.MultiheadAttention (the plain model's own path) is replaced by tome's SDPA route
# (tome/adapters/common/mha.py), which rounds differently in bf16 (exact in fp32: test_contract).
BF16_REROUNDED = frozenset({"torchvision_vit", "open_clip"})


@dataclass
class Case:
    """A tiny model of one family, its inputs, and the settings that merge / merge nothing."""

    model: torch.nn.Module
    kwargs: dict
    merge: dict
    none: dict
    args: tuple = ()
    carry: bool = True  # tokens carried shorter from block to block (model.tome.tokens_per_layer)

    def run(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
        args, kwargs = self.args, self.kwargs
        if dtype is not None:
            args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
        with torch.no_grad():
            return _out(model(*args, **kwargs))


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def _out(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return _out(output[0])
    for name in ("last_hidden_state", "sample", "logits"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no tensor in {type(output).__name__}")


def _images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _r(merge: int = 4) -> tuple[dict, dict]:
    return {"r": merge}, {"r": 0}


# -- builders -------------------------------------------------------------------------------------


def _timm_vit() -> Case:
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=28, patch_size=4, embed_dim=32, depth=2,
        num_heads=2, num_classes=5,
    )  # fmt: skip
    for module in model.modules():  # LayerScale starts near 0: give the blocks weight
        if hasattr(module, "gamma"):
            torch.nn.init.constant_(module.gamma, 0.5)
    return Case(model, {}, *_r(), args=(_images(28),))


def _timm_eva() -> Case:
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, img_size=28, patch_size=4, embed_dim=32, depth=2,
        num_heads=2, num_classes=5,
    )  # fmt: skip
    return Case(model, {}, *_r(), args=(_images(28),))


def _transformers(config_name: str, model_name: str, **config) -> Case:
    transformers = pytest.importorskip("transformers")
    base = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 4,
    }
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**{**base, **config}))
    model.set_attn_implementation("sdpa")
    return Case(model, {"pixel_values": _images(28)}, *_r())


def _hf_vit() -> Case:
    return _transformers("ViTConfig", "ViTModel", intermediate_size=64)


def _hf_dinov2() -> Case:
    return _transformers("Dinov2Config", "Dinov2Model", mlp_ratio=2)


def _hf_clip_vision() -> Case:
    return _transformers("CLIPVisionConfig", "CLIPVisionModel", intermediate_size=64)


def _hf_siglip() -> Case:
    return _transformers("SiglipVisionConfig", "SiglipVisionModel", intermediate_size=64)


def _bert() -> Case:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = transformers.BertModel(config)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 50, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0  # right padding: the masked path
    # min_tokens=0: merge even so short a text (the default leaves short texts alone)
    return Case(model, {"input_ids": ids, "attention_mask": mask}, {"r": 4, "min_tokens": 0}, {"r": 0})


def _torchvision_vit() -> Case:
    models = pytest.importorskip("torchvision.models")
    model = models.VisionTransformer(
        image_size=28, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision initializes the head to zeros
    return Case(model, {}, *_r(), args=(_images(28),))


def _open_clip() -> Case:
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    model = VisionTransformer(
        image_size=28, patch_size=4, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16
    )
    return Case(model, {}, *_r(), args=(_images(28),))


def _diffusers_unet() -> Case:
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, attention_head_dim=8,
        sample_size=16, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    kwargs = {
        "sample": torch.randn(2, 4, 16, 16, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, 7, 16, generator=g),
    }
    return Case(model, kwargs, {"ratio": 0.5}, {"ratio": 0.0}, carry=False)


def _diffusers_pixart() -> Case:
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=12, norm_num_groups=4,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    kwargs = {
        "hidden_states": torch.randn(2, 4, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(2, 5, 12, generator=g),
        "timestep": torch.full((2,), 500),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    return Case(model, kwargs, {"ratio": 0.5}, {"ratio": 0.0}, carry=False)


FAMILIES: dict[str, Callable[[], Case]] = {
    "timm_vit": _timm_vit,
    "timm_eva": _timm_eva,
    "hf_vit": _hf_vit,
    "hf_dinov2": _hf_dinov2,
    "hf_clip_vision": _hf_clip_vision,
    "hf_siglip": _hf_siglip,
    "bert": _bert,
    "torchvision_vit": _torchvision_vit,
    "open_clip": _open_clip,
    "diffusers_unet": _diffusers_unet,
    "diffusers_pixart": _diffusers_pixart,
}


def build(name: str) -> Case:
    torch.manual_seed(0)
    case = FAMILIES[name]()
    case.model.eval()
    return case


# -- torch.compile ------------------------------------------------------------------------------


def _compile_check(name: str, backend: str, tol: float) -> None:
    torch._dynamo.reset()  # each family's graphs alone (and the cache-size limit per test)
    case = build(name)
    tome.patch(case.model, **case.merge)
    expected = case.run(case.model)
    counts = list(case.model.tome.tokens_per_layer) if case.carry else None
    fullgraph = name not in NOT_FULLGRAPH
    # with graph breaks, each piece's AOT compile costs seconds: Dynamo's own capture suffices
    compiled = torch.compile(case.model, fullgraph=fullgraph, backend=backend if fullgraph else "eager")
    got = case.run(compiled)
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    if case.carry:
        assert counts[-1] < counts[0]  # it merged, and the compiled pass merged alike
        assert case.model.tome.tokens_per_layer == counts
    else:
        assert not torch.equal(expected, case.run(tome.unpatch(case.model)))  # it merged


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_patched_model_equals_eager(name):
    _compile_check(name, "aot_eager", 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_dinov2"])  # timm's: test_patch_timm.py
def test_inductor_patched_model_equals_eager(name):
    _compile_check(name, "inductor", 1e-4)


def test_diffusers_models_patched_before_the_bound_forwards_still_run():
    # A UNet pickled before tome bound the classes' forwards at patch time loads with the old
    # installed functions (block_forward, op_forward): they still run, to the same output.
    from tome.adapters.common import diffusion
    from tome.runtime.install import InstalledMethod

    case = build("diffusers_unet")
    tome.patch(case.model, **case.merge)
    expected = case.run(case.model)
    old = {
        diffusion.class_block_forward: diffusion.block_forward,
        diffusion.class_op_forward: diffusion.op_forward,
    }
    swapped = 0
    for module in case.model.modules():
        installed = module.__dict__.get("forward")
        if isinstance(installed, InstalledMethod) and installed.function in old:
            module.forward = InstalledMethod(old[installed.function], module, *installed.bound[1:])
            swapped += 1
    assert swapped > 2
    assert torch.equal(case.run(case.model), expected)


# -- bf16 ---------------------------------------------------------------------------------------


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("how", ["to_bf16", "autocast"])
@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_nothing_merging_matches_the_unpatched_bf16_model(name, how):
    case = build(name)
    plain = copy.deepcopy(case.model)
    fp32 = case.run(plain)
    tome.patch(case.model, **case.none)
    if how == "to_bf16":
        plain.to(torch.bfloat16), case.model.to(torch.bfloat16)
        expected, got = case.run(plain, torch.bfloat16), case.run(case.model, torch.bfloat16)
        assert got.dtype == torch.bfloat16
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, got = case.run(plain), case.run(case.model)
    if name in BF16_REROUNDED:
        # another attention route: other roundings, no further from fp32 than the model's own bf16
        assert _relative(got, fp32) <= 1.25 * _relative(expected, fp32) + 1e-3
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * float(fp32.abs().max()))
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("how", ["to_bf16", "autocast"])
@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_merging_runs(name, how):
    case = build(name)
    tome.patch(case.model, **case.merge)
    full = case.run(case.model)
    counts = list(case.model.tome.tokens_per_layer) if case.carry else None
    if how == "to_bf16":
        case.model.to(torch.bfloat16)
        got = case.run(case.model, torch.bfloat16)
        assert got.dtype == torch.bfloat16
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = case.run(case.model)
    assert got.shape == full.shape and torch.isfinite(got).all()
    if case.carry:  # the same schedule: merges may pick other partners in bf16, never fewer
        assert case.model.tome.tokens_per_layer == counts
