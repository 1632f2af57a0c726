"""tome.tools.pictures.vis: the three panels are right by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tome.tools.pictures.vis import compose, merge_panels, palette

timm = pytest.importorskip("timm")


def _random_source(B: int, n: int, groups: int, offset: int, seed: int = 0) -> torch.Tensor:
    """A source map where every one of ``groups`` groups owns >= 1 patch, indices from offset."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(0, groups, (B, n), generator=g)
    source[:, :groups] = torch.stack([torch.randperm(groups, generator=g) for _ in range(B)])
    return source + offset


def test_palette_colours_are_distinct():
    colors = palette(300)
    assert colors.shape == (300, 3) and colors.dtype == np.uint8
    assert len({tuple(c) for c in colors}) == 300


@pytest.mark.parametrize("patch", [1, 4])
def test_every_patch_has_its_group_colour(patch):
    B, gh, gw, P = 3, 5, 6, 2
    source = _random_source(B, gh * gw, groups=9, offset=P)
    unit = torch.rand(B, 3, gh * patch, gw * patch)
    panels = merge_panels(unit, source, (gh, gw), patch)
    assert panels.num_groups == [9, 9, 9]
    for b in range(B):
        src = source[b].view(gh, gw).numpy()
        colour_of: dict[int, tuple] = {}
        for i in range(gh):
            for j in range(gw):
                block = panels.colors[b, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
                assert (block == block[0, 0]).all()  # one colour per patch
                colour = tuple(block[0, 0])
                # same source index <-> same colour
                assert colour_of.setdefault(int(src[i, j]), colour) == colour
        assert len(set(colour_of.values())) == len(colour_of)  # different groups, different colours


def test_averaged_panel_is_the_group_mean_colour():
    B, gh, gw, patch = 2, 4, 4, 3
    source = _random_source(B, gh * gw, groups=5, offset=1, seed=3)
    unit = torch.rand(B, 3, gh * patch, gw * patch)
    panels = merge_panels(unit, source, (gh, gw), patch, average="color")
    pixels = unit.permute(0, 2, 3, 1).numpy()
    for b in range(B):
        src = np.repeat(np.repeat(source[b].view(gh, gw).numpy(), patch, 0), patch, 1)
        for group in np.unique(src):
            mask = src == group
            expected = pixels[b][mask].mean(0) * 255
            got = panels.averaged[b][mask].astype(float)
            assert np.abs(got - expected).max() <= 0.51  # uint8 rounding


def test_averaged_panel_patch_mode_is_the_group_mean_patch():
    B, gh, gw, patch = 1, 3, 4, 2
    source = _random_source(B, gh * gw, groups=4, offset=1, seed=5)
    unit = torch.rand(B, 3, gh * patch, gw * patch)
    panels = merge_panels(unit, source, (gh, gw), patch, average="patch")
    img = unit[0].permute(1, 2, 0).numpy()
    tiles = img.reshape(gh, patch, gw, patch, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, patch, patch, 3)
    out = (
        panels.averaged[0]
        .reshape(gh, patch, gw, patch, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(gh * gw, patch, patch, 3)
    )
    src = source[0].numpy()
    for k in range(gh * gw):
        expected = tiles[src == src[k]].mean(0) * 255
        assert np.abs(out[k].astype(float) - expected).max() <= 0.51


def test_no_source_means_every_patch_alone_and_original_kept():
    unit = torch.rand(2, 3, 8, 8)
    panels = merge_panels(unit, None, (2, 2), 4)
    assert panels.num_groups == [4, 4]
    assert panels.outline.any()  # four groups: there are borders
    expected = (unit.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(panels.original, expected)


def test_outline_only_between_different_groups():
    source = torch.tensor([[1, 1, 2, 2]])  # 2x2 grid: top row group 1, bottom row group 2
    panels = merge_panels(torch.rand(1, 3, 4, 4), source, (2, 2), 2)
    outline = panels.outline[0]
    assert outline[1].all() and outline[2].all()  # the horizontal border
    assert not outline[0].any() and not outline[3].any()


def test_compose_size_and_titles():
    panels = merge_panels(torch.rand(1, 3, 16, 16), torch.arange(16).view(1, 16) // 2 + 1, (4, 4), 4)
    image = compose(panels, 0, titles=("a", "b", "c"), gap=4)
    assert image.size == (3 * 16 + 8, 16 + 16)
    assert compose(panels, 0, titles=None, scale=2).size == (3 * 32 + 8, 32)


def test_source_shape_checked():
    with pytest.raises(ValueError, match="source"):
        merge_panels(torch.rand(1, 3, 8, 8), torch.zeros(1, 5, dtype=torch.long), (2, 2), 4)


def _tiny_timm():
    from tome.tools.models.vision import from_module

    torch.manual_seed(0)
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3, num_classes=7)
    return from_module(module)


def test_groups_are_the_groups_the_model_merged():
    """Patches coloured alike hold exactly the same final token, and vice versa."""
    from tome.tools.images import normalize

    model = _tiny_timm()
    unit = torch.rand(3, 3, 64, 64)
    model.set_r(3, unmerge_detail=False)  # unmerged tokens: copies of their group's token
    out = model(normalize(unit, model.mean, model.std))
    assert out.source is not None and out.source.min() >= model.protected
    panels = merge_panels(unit, out.source, model.grid, model.patch_size)
    final = model.module.tome.tokens_per_layer[-1]
    assert panels.num_groups == [final - model.protected] * 3
    for b in range(3):
        groups = panels.groups[b].reshape(-1)
        feats = out.patches[b]
        for i in range(len(groups)):
            same = torch.from_numpy(groups == groups[i])
            # the unmerged patch features are identical exactly within a group
            equal = (feats == feats[i]).all(-1)
            assert torch.equal(equal, same)


def test_visualize_returns_pictures():
    from PIL import Image

    from tome.tools.pictures.vis import visualize

    model = _tiny_timm()
    images = [Image.new("RGB", (80, 60), (200, 30, 30)), Image.new("RGB", (50, 90), (10, 200, 40))]
    pictures = visualize(model, images, 4)
    assert [p.size for p in pictures] == [(3 * 64 + 8, 64 + 16)] * 2
    assert not model.patched or model.module.tome.r == 4
