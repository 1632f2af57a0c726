"""tome.tune (tome.tools.tune) / tome tune: per-layer schedules for a target speedup, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import tome
from tome.tools.cli import main
from tome.tools.data import demo_images
from tome.tools.model import from_module
from tome.tools.schedule_text import parse_r, r_label
from tome.tools.tune import TuneError, schedule_flops, schedule_tokens

timm = pytest.importorskip("timm")

FAST = dict(budget="flops", progress=False, max_evals=12)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _timm(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"img_size": 64, "depth": 4, **kwargs}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


def _pixels(n: int = 8, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_reaches_flop_target_deterministically_and_restores_the_model():
    model, pixels = _timm(), _pixels()
    before = _state(model)
    with torch.no_grad():
        reference = model(pixels)
    result = tome.tune(model, pixels, 2.0, **FAST)
    again = tome.tune(model, pixels, 2.0, **FAST)
    assert result.schedule == again.schedule and result.fidelity == again.fidelity
    assert len(result.schedule) == 4 and all(isinstance(r, int) and r >= 0 for r in result.schedule)
    assert result.flops_speedup >= 2.0 and result.measured_speedup is None
    wrapper = from_module(model)
    assert result.flops_speedup == pytest.approx(
        schedule_flops(wrapper, [0] * 4) / schedule_flops(wrapper, result.schedule)
    )
    assert (
        -1 <= result.cls_cosine <= 1
        and result.fidelity >= result.start_cls_cosine + result.start_patch_cosine - 1e-6
    )
    assert "tome" not in model.__dict__  # unpatched again, bit-identical
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(pixels), reference)


def test_apply_leaves_the_schedule_and_token_counts_match():
    model, pixels = _timm(), _pixels()
    result = tome.tune(model, pixels, 1.5, apply=True, **FAST)
    assert model.tome.r == result.schedule
    with torch.no_grad():
        model(pixels)
    assert model.tome.tokens_per_layer == result.tokens == schedule_tokens(result.schedule, 17, 1)


def test_patched_model_keeps_its_settings():
    model, pixels = _timm(), _pixels()
    tome.patch(model, r=3, prop_attn=False)
    tome.tune(model, pixels, 1.5, **FAST)
    assert model.tome.r == 3 and model.tome.prop_attn is False
    result = tome.tune(model, pixels, 1.5, apply=True, **FAST)
    assert model.tome.r == result.schedule and model.tome.prop_attn is False


def test_model_without_class_token_uses_pooled_output():
    model = _timm(class_token=False, global_pool="avg")
    result = tome.tune(model, _pixels(), 1.5, **FAST)
    assert result.flops_speedup >= 1.5 and result.tokens[0] == 16


def test_transformers_and_paths():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=48, patch_size=8
    )
    torch.manual_seed(0)
    model = transformers.Dinov2Model(config).eval()
    paths = [str(p) for p in demo_images()] * 3  # 9 images, read and preprocessed by tune
    result = tome.tune(model, paths, 1.6, **FAST)
    assert len(result.schedule) == 3 and result.flops_speedup >= 1.6
    assert result.images == 7 and result.heldout_images == 2  # holdout=0.25 of 9


def test_measured_budget_times_the_schedule():
    result = tome.tune(
        _timm(), _pixels(), 1.5, budget="measured", progress=False, max_evals=4, reps=1, rounds=1
    )
    assert result.measured_speedup > 0 and 1 <= len(result.history) <= 2
    # tiny models time badly (overheads): the FLOP target is corrected at most by max_correction
    assert all(1.5 / 1.15 - 1e-9 <= h["flop_target"] <= 1.5 * 1.15 + 1e-9 for h in result.history)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(images=_pixels(3)), TuneError, "at least 8 calibration images, got 3"),
        (dict(target_speedup=0.0), TuneError, "positive"),
        (dict(target_speedup=-2.0), TuneError, "positive"),
        (dict(target_speedup=1.0), TuneError, "> 1"),
        (dict(target_speedup=50.0), TuneError, "at most"),
        (dict(images=_pixels(8, 32)), TuneError, "64x64"),
        (dict(images="photos/"), TypeError, "images"),
        (dict(budget="fast"), ValueError, "budget"),
        (dict(patch_weight=-1.0), ValueError, "patch_weight: expected a number >= 0, got -1.0"),
        (dict(span=0), ValueError, "span: expected an int >= 1, got 0"),
        (dict(rounds=1.5), ValueError, "rounds: expected an int >= 0, got 1.5"),
    ],
)
def test_bad_input(kwargs, error, message):
    args = {"model": _timm(), "images": _pixels(), "target_speedup": 2.0, **FAST, **kwargs}
    with pytest.raises(error, match=message):
        tome.tune(**args)


def test_heldout_check():
    """The search's schedule is kept only if it does no worse than its starting ramp on images
    the search never saw; holdout=0 searches on every image, unchecked."""
    model, pixels = _timm(), _pixels(12)
    result = tome.tune(model, pixels, 2.0, **FAST)
    assert result.images == 9 and result.heldout_images == 3
    assert result.heldout_fidelity >= result.heldout_start_fidelity - 1e-6
    if not result.search_kept:
        assert result.schedule == result.start_schedule
    unchecked = tome.tune(model, pixels, 2.0, holdout=0, **FAST)
    assert unchecked.images == 12 and unchecked.heldout_images == 0 and unchecked.heldout_fidelity is None
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="holdout"):
            tome.tune(model, pixels, 2.0, holdout=bad, **FAST)


def test_keeps_every_training_mode():
    model = _timm().train()
    model.blocks[0].eval()  # a mixed state comes back as it was
    modes = [m.training for m in model.modules()]
    tome.tune(model, _pixels(), 1.5, **FAST)
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(TuneError):  # also when tune refuses the input
        tome.tune(model, _pixels(3), 1.5, **FAST)
    assert [m.training for m in model.modules()] == modes
    model.eval()
    tome.tune(model, _pixels(), 1.5, **FAST)
    assert not any(m.training for m in model.modules())


def test_subclass_of_a_supported_model():
    class MyViT(timm.models.vision_transformer.VisionTransformer):
        pass

    torch.manual_seed(0)
    model = MyViT(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3).eval()
    result = tome.tune(model, _pixels(), 1.3, **FAST)
    assert len(result.schedule) == 2 and result.flops_speedup >= 1.3


def test_unsupported_model():
    with pytest.raises(TypeError, match="does not support"):
        tome.tune(nn.Linear(3, 3), _pixels(), 2.0, **FAST)


# -- input sizes: the size of the pixels given, any the model accepts ----------------------------


def _tiny_dinov2(**kwargs) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=64, patch_size=8,
        **kwargs,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Dinov2Model(config).eval()


def test_runs_at_the_size_of_the_pixels_given():
    """A transformers DINOv2 whose config says 64 px takes 32 px (it interpolates its position
    embeddings), and so does a timm ViT built with dynamic_img_size; a wrapper made for another
    size is resized too."""
    model = _tiny_dinov2()
    result = tome.tune(model, _pixels(size=32), 1.3, **FAST)
    assert result.tokens[0] == 1 + 4 * 4 and result.flops_speedup >= 1.3
    assert "tome" not in model.__dict__
    wrapped = tome.tune(from_module(model), _pixels(size=48), 1.3, **FAST)
    assert wrapped.tokens[0] == 1 + 6 * 6
    dynamic = _timm(dynamic_img_size=True)
    result = tome.tune(dynamic, _pixels(size=96), 1.5, **FAST)
    assert result.tokens[0] == 1 + 6 * 6 and result.flops_speedup >= 1.5


def _tiny_vit(transformers) -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8,
    )  # fmt: skip
    return transformers.ViTModel(config).eval()


def test_wrong_size_names_the_sizes_the_model_accepts():
    transformers = pytest.importorskip("transformers")
    cases = [
        (_timm(), _pixels(size=32), ["64x64 pixels only", "dynamic_img_size=True", "got 32x32"]),
        (_tiny_dinov2(), _pixels(size=36), ["any multiple of 8 pixels", "got 36x36"]),
        (
            _tiny_vit(transformers),
            _pixels(size=48),
            ["32x32 pixels only", "interpolate_pos_encoding", "got 48x48"],
        ),
        (_tiny_dinov2(), torch.randn(8, 3, 32, 48), ["square", "32x48"]),
    ]
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = tv.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3
    )
    cases.append((vit.eval(), _pixels(size=64), ["32x32 pixels only", "image_size=32", "got 64x64"]))
    for model, pixels, parts in cases:
        with pytest.raises(TuneError) as error:
            tome.tune(model, pixels, 1.3, **FAST)
        assert all(part in str(error.value) for part in parts), (str(error.value), parts)
        assert "tome" not in model.__dict__


@pytest.mark.slow
def test_real_dinov2_at_224_px(dinov2_dir, images_dir):
    """The natural call: the shared DINOv2-S (config image_size 518) tuned on 224 px photos."""
    transformers = pytest.importorskip("transformers")
    from _dinov2_timm import load_images

    model = transformers.Dinov2Model.from_pretrained(str(dinov2_dir)).eval()
    pixels = load_images(images_dir, 8, size=224)
    result = tome.tune(model, pixels, 1.5, budget="flops", progress=False, max_evals=4, batch=8)
    assert result.tokens[0] == 1 + 16 * 16 and len(result.schedule) == 12
    assert result.flops_speedup >= 1.5 and result.cls_cosine > 0.9
    with pytest.raises(TuneError, match="any multiple of 14 pixels"):
        tome.tune(model, torch.randn(8, 3, 230, 230), 1.5, **FAST)


def test_parse_r_per_layer_list():
    assert parse_r("8,[4,2,0],16:-1.0") == [8, [4, 2, 0], (16, -1.0)]
    assert r_label([4, 2, 0]) == "[4,2,0]"


TINY = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "64", "-q"]


def test_cli_tune(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        for path in demo_images():
            (folder / f"{i}_{path.name}").write_bytes(path.read_bytes())
    args = [
        "tune",
        "--images",
        str(folder),
        "--target",
        "1.5",
        "--budget",
        "flops",
        "--max-evals",
        "6",
        *TINY,
    ]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["schedule"]) == 12 and data["flops_speedup"] >= 1.5
    assert data["images"] == 7 and data["heldout_images"] == 2  # --holdout 0.25 of 9
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "schedule: [" in out and "CLS cosine" in out and "held-out check" in out
    # the printed schedule goes into eval as it is
    assert (
        main(["eval", "--images", str(folder), "--limit", "2", "--r", r_label(data["schedule"]), *TINY]) == 0
    )
    capsys.readouterr()

    for extra, message in (
        (["--limit", "4"], "at least 8"),
        (["--target", "99"], "at most"),
        (["--target", "0.5"], "--target"),
        (["--holdout", "1.5"], "--holdout"),
        (["--holdout", "-0.1"], "--holdout"),
        (["--patch-weight", "-1"], "--patch-weight"),
    ):
        assert main([*args, *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tome: error:")]
        assert len(err) == 1 and message in err[0]
