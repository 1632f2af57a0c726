"""``tome viz --model diffusers:FOLDER``: one block's merge groups on the latent grid, for tiny
random diffusers models saved with save_pretrained (real classes, no mocks)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_errors import one_error_line

from tome.cli.main import main

diffusers = pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")

CROSS = 32


def _vae(levels: int = 2) -> torch.nn.Module:
    """A tiny AutoencoderKL: 4 latent channels, downsampling 2 ** (levels - 1)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(8,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4, norm_num_groups=8, sample_size=32,
    ).eval()  # fmt: skip


def _unet() -> torch.nn.Module:
    """SD 1.x layout, 16 x 16 latents (32 px with the VAE's /2)."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=CROSS, attention_head_dim=8,
        sample_size=16, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()  # fmt: skip


def _pixart() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=12, norm_num_groups=4,
    ).eval()  # fmt: skip


def _dit() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=16,
        patch_size=2, norm_num_groups=4,
    ).eval()  # fmt: skip


def _sd3() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
        pooled_projection_dim=10, out_channels=4, pos_embed_max_size=16,
    ).eval()  # fmt: skip


def _flux() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def unet_pipeline(tmp_path_factory) -> Path:
    """A StableDiffusionPipeline folder without text encoder or tokenizer (never loaded)."""
    folder = tmp_path_factory.mktemp("sd") / "pipe"
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(), text_encoder=None, tokenizer=None, unet=_unet(), scheduler=diffusers.PNDMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vae") / "vae"
    _vae().save_pretrained(folder)
    return folder


def _viz(folder: Path, photos: Path, out: Path, *extra: str) -> int:
    return main(["viz", str(photos), "--model", f"diffusers:{folder}", "--out", str(out), "-q", *extra])


def test_unet_pipeline_folder_writes_one_png_per_photo(unet_pipeline, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert _viz(unet_pipeline, photos, out) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    # default ratio 0.5; default block: the first that merges (down_blocks.0, full resolution)
    assert written == ["astronaut_ratio0.5_block0.png", "chelsea_ratio0.5_block0.png"]
    assert capsys.readouterr().out.split() == [str(out / name) for name in written]
    with PIL.open(out / written[0]) as picture:
        # three panels of 16 x 16 latents at 8 px each (the 32 px photo enlarged: outlines leave
        # colour), 4 px gaps, a 16 px title row
        assert picture.size == (3 * 128 + 8, 128 + 16)


def test_unet_groups_are_the_blocks_merges_and_follow_the_photo(unet_pipeline):
    """The drawn groups are what the block merged: 16 x 16 tokens -> 128 groups at ratio 0.5;
    a flat photo (every latent alike) and a photo with a split merge differently."""
    import tome
    from tome.tools.images import to_unit
    from tome.tools.pictures.vis_diffusion import (
        block_groups,
        denoiser_inputs,
        load_diffusion,
        noised_latents,
        visualize_diffusion,
    )

    model = load_diffusion(f"diffusers:{unet_pipeline}")
    assert model.kind == "UNet2DConditionModel" and model.img_size == 32 and not model.flow
    assert model.scheduler["_class_name"] == "PNDMScheduler"  # the pipeline's noise schedule
    images = [PIL.new("RGB", (40, 32), (120, 120, 120)), PIL.new("RGB", (32, 32), (0, 0, 0))]
    images[1].paste((255, 255, 255), (0, 0, 16, 32))  # left half white
    pictures, block = visualize_diffusion(model, images, 0.5, timestep=100)
    assert block == 0 and [p.size for p in pictures] == [(392, 144)] * 2
    tome.patch(model.denoiser, ratio=0.5, use_rand=False)
    latents = noised_latents(model, to_unit(images, 32, 1.0), 100)
    assert latents.shape == (2, 4, 16, 16)
    found = block_groups(model.denoiser, denoiser_inputs(model, latents, 100))
    blocks = model.denoiser.tome.blocks
    # max_downsample 1: the full-resolution blocks merge, the 2x-downsampled ones do not
    assert list(found) == [0, 4, 5]
    assert [blocks[i].split(".")[:2] for i in found] == [
        ["down_blocks", "0"],
        ["up_blocks", "1"],
        ["up_blocks", "1"],
    ]
    source, grid = found[0]
    assert grid == (16, 16) and source.shape == (2, 256)
    assert [len(set(s.tolist())) for s in source] == [128, 128]
    assert not torch.equal(source[0], source[1])  # the content decides the groups


def test_pixart_pipeline_folder(tmp_path, photos, capsys):
    folder = tmp_path / "pixart"
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=None, text_encoder=None, vae=_vae(), transformer=_pixart(),
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    )  # fmt: skip
    pipe.save_pretrained(folder)
    out = tmp_path / "out"
    assert _viz(folder, photos, out, "--ratio", "0.25,0.5", "--block", "1", "--limit", "1") == 0
    assert sorted(p.name for p in out.glob("*.png")) == [
        "astronaut_ratio0.25_block1.png", "astronaut_ratio0.5_block1.png",
    ]  # fmt: skip
    with PIL.open(out / "astronaut_ratio0.5_block1.png") as picture:
        assert picture.size == (3 * 64 + 8, 64 + 16)  # 8 x 8 patches of 2 x 2 latents, 8 px each


@pytest.mark.parametrize("build", [_dit, _sd3, _flux], ids=["dit", "sd3", "flux"])
def test_bare_dit_folders_with_a_vae(build, tmp_path, photos, vae_folder):
    folder = tmp_path / "model"
    build().save_pretrained(folder)
    out = tmp_path / "out"
    size = ["--img-size", "32"] if build is _flux else []  # Flux has no sample_size (1024 px default)
    code = _viz(folder, photos, out, "--vae", str(vae_folder), "--limit", "1", "--no-titles", *size)
    assert code == 0
    [written] = out.glob("*.png")
    assert written.name == "astronaut_ratio0.5_block0.png"
    with PIL.open(written) as picture:
        assert picture.size == (3 * 64 + 8, 64)  # 8 x 8 tokens (DiT, SD3: 2 x 2 patches; Flux: packed)
        colours = np.asarray(picture)[:, 68:132].reshape(-1, 3)
        assert len(np.unique(colours, axis=0)) > 8  # many groups, each its own colour


def test_sdxl_unet_needs_max_downsample_2(tmp_path, photos, vae_folder, capsys):
    """SDXL's layout (no attention at full resolution, text-time conditioning): nothing merges
    at tomesd's max_downsample 1, and the error says what to change."""
    torch.manual_seed(0)
    folder = tmp_path / "sdxl"
    diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=CROSS, attention_head_dim=8,
        sample_size=16, norm_num_groups=8, transformer_layers_per_block=(1, 2), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + CROSS,
    ).save_pretrained(folder)  # fmt: skip
    out = tmp_path / "out"
    assert _viz(folder, photos, out, "--vae", str(vae_folder), "--limit", "1") == 2
    line = one_error_line(capsys)
    assert "--ratio 0.5: no block" in line and "a larger --max-downsample" in line
    assert _viz(folder, photos, out, "--vae", str(vae_folder), "--limit", "1", "--max-downsample", "2") == 0
    [written] = out.glob("*.png")
    with PIL.open(written) as picture:
        assert picture.size == (3 * 64 + 8, 64 + 16)  # 8 x 8 tokens at 2x downsampling


def test_same_picture_for_any_batch(unet_pipeline, photos, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _viz(unet_pipeline, photos, one, "--batch", "1") == 0
    assert _viz(unet_pipeline, photos, two, "--batch", "2") == 0
    for path in one.glob("*.png"):
        with PIL.open(path) as a, PIL.open(two / path.name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_tomesd_options_change_the_groups(unet_pipeline, photos, tmp_path):
    plain, strided = tmp_path / "plain", tmp_path / "strided"
    assert _viz(unet_pipeline, photos, plain, "--limit", "1", "--no-titles") == 0
    assert _viz(unet_pipeline, photos, strided, "--limit", "1", "--no-titles", "--sx", "4", "--sy", "4") == 0
    with PIL.open(next(plain.glob("*.png"))) as a, PIL.open(next(strided.glob("*.png"))) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_are_one_line_errors(unet_pipeline, photos, tmp_path, capsys, vae_folder):
    not_diffusers = tmp_path / "vit"
    not_diffusers.mkdir()
    (not_diffusers / "config.json").write_text('{"model_type": "vit"}')
    bare = tmp_path / "bare"
    _unet().save_pretrained(bare)
    wide = tmp_path / "wide-vae"
    diffusers.AutoencoderKL(block_out_channels=(8,), latent_channels=8, norm_num_groups=8).save_pretrained(
        wide
    )
    out = str(tmp_path / "out")
    cases = [
        (["--model", f"diffusers:{tmp_path / 'missing'}"], "--model .*no such folder"),
        (["--model", f"diffusers:{not_diffusers}"], "--model .*a model without _class_name.*tome viz draws"),
        (["--model", f"diffusers:{tmp_path / 'photos'}"], "--model .*not a diffusers folder"),
        (["--model", f"diffusers:{vae_folder}"], "--model .*AutoencoderKL; give it as --vae"),
        (["--model", f"diffusers:{bare}"], "--model .*no VAE .*--vae FOLDER"),
        (["--model", f"diffusers:{bare}", "--vae", str(bare)], "--vae .*not a diffusers VAE folder"),
        (["--model", f"diffusers:{bare}", "--vae", str(wide)], "--vae: the VAE's latents have 8 channels; .*takes 4"),
        (["--model", f"diffusers:{unet_pipeline}", "--block", "99"], r"--block 99: .* has 7 transformer blocks \(0..6\)"),
        (["--model", f"diffusers:{unet_pipeline}", "--block", "1"], "--block 1: block 1 .* merges nothing .*blocks that merge: 0, 4, 5"),
        (["--model", f"diffusers:{unet_pipeline}", "--block", "mid"], "--block 'mid': not a block"),
        (["--model", f"diffusers:{unet_pipeline}", "--r", "16"], "--r: .*give --ratio"),
        (["--model", f"diffusers:{unet_pipeline}", "--ratio", "0"], "--ratio 0: .*0 < ratio < 1"),
        (["--model", f"diffusers:{unet_pipeline}", "--timestep", "1000"], "--timestep 1000: expected 0 <= T < 1000"),
        (["--model", f"diffusers:{unet_pipeline}", "--img-size", "30"], "--img-size 30: .*multiples of 4"),
        (["--model", f"diffusers:{unet_pipeline}", "--sx", "0"], "--sx: "),
        (["--model", f"diffusers:{unet_pipeline}", "--weights", "x.pt"], "--weights: not for diffusers"),
        (["--model", "timm:vit_tiny_patch16_224", "--block", "1"], "--block: only for diffusion models"),
    ]  # fmt: skip
    for extra, pattern in cases:
        assert main(["viz", str(photos), "--out", out, "-q", *extra]) == 2, extra
        line = one_error_line(capsys)
        assert re.search(pattern, line), (pattern, line)
    assert not list(Path(out).glob("*.png"))


def test_other_commands_point_diffusion_models_to_viz(unet_pipeline, capsys):
    assert main(["bench", "--model", f"diffusers:{unet_pipeline}", "-q"]) == 2
    assert "diffusion models work with tome viz" in one_error_line(capsys)


def test_viz_help_names_the_diffusion_options(capsys):
    with pytest.raises(SystemExit):
        main(["viz", "--help"])
    out = capsys.readouterr().out
    assert (
        "diffusers:FOLDER" in out and "--timestep T" in out and "--vae FOLDER" in out and "--block B" in out
    )
