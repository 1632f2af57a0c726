"""Pictures of what token merging merged (the seed's three panels, batch-friendly).

For every image: the original; every merged group in its own colour; the pixels averaged per
group. Groups come from the model's final source map over the patch grid (protected tokens,
e.g. the class token, are not patches and are left out), so every patch is coloured by the
group it really ended in.

>>> import torch
>>> unit = torch.rand(1, 3, 32, 32)
>>> source = torch.tensor([[0, 0, 1, 1, 0, 2, 1, 1, 3, 3, 3, 1, 3, 3, 2, 2]])
>>> panels = merge_panels(unit, source, grid=(4, 4), patch=8)
>>> panels.groups.shape, panels.colors.shape, panels.averaged.shape
((1, 4, 4), (1, 32, 32, 3), (1, 32, 32, 3))
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tome.core import merge as M

__all__ = ["Panels", "compose", "group_sizes", "merge_panels", "palette", "visualize"]


def palette(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct colours (n, 3) uint8: hues spread by the golden ratio over a few
    saturation/brightness levels, shuffled so that groups with close indices (often neighbours
    in the image) get unlike colours."""
    golden = 0.618033988749895
    colors = np.empty((max(n, 0), 3), dtype=np.uint8)
    levels = ((0.75, 0.95), (0.55, 0.75), (0.95, 0.6), (0.4, 0.95))
    for i in range(n):
        s, v = levels[(i // 7) % len(levels)]
        r, g, b = colorsys.hsv_to_rgb((i * golden) % 1.0, s, v)
        colors[i] = (round(r * 255), round(g * 255), round(b * 255))
    order = np.random.default_rng(seed).permutation(n)
    return colors[order]


def group_sizes(source: torch.Tensor, num_groups: int) -> torch.Tensor:
    """How many patches each group holds: (B, num_groups) float32."""
    sizes = torch.zeros(source.shape[0], num_groups, dtype=torch.float32, device=source.device)
    return sizes.scatter_add_(1, source, torch.ones_like(source, dtype=torch.float32))


@dataclass
class Panels:
    """The pictures of one batch, as numpy arrays.

    original/colors/averaged: (B, H, W, 3) uint8, H = gh * patch, W = gw * patch.
    groups: (B, gh, gw) int64 group of every patch (0..G-1). outline: (B, H, W) bool, pixels on a
    boundary between two groups. num_groups: G per image.
    """

    original: np.ndarray
    colors: np.ndarray
    averaged: np.ndarray
    groups: np.ndarray
    outline: np.ndarray
    num_groups: list[int]


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def group_outline(groups: np.ndarray, patch: int) -> np.ndarray:
    """Pixels on the border between patches of different groups (1 px each side)."""
    full = np.repeat(np.repeat(groups, patch, axis=1), patch, axis=2)
    edge = np.zeros(full.shape, dtype=bool)
    vertical = full[:, :, 1:] != full[:, :, :-1]
    horizontal = full[:, 1:, :] != full[:, :-1, :]
    edge[:, :, 1:] |= vertical
    edge[:, :, :-1] |= vertical
    edge[:, 1:, :] |= horizontal
    edge[:, :-1, :] |= horizontal
    return edge


def merge_panels(
    unit: torch.Tensor,
    source: torch.Tensor | None,
    grid: tuple[int, int],
    patch: int,
    *,
    average: str = "color",
    seed: int = 0,
) -> Panels:
    """Build the three panels for a batch.

    Args:
        unit: (B, 3, H, W) images in [0, 1] as the model saw them (H >= gh * patch).
        source: (B, gh * gw) group of every patch, as an index in the merged sequence; the
            protected tokens must already be removed (``model.tome.source[:, protected:]``).
            Indices need not start at 0 (they start at ``protected``); each distinct index is a
            group. ``None``: nothing merged, every patch is its own group.
        grid: (gh, gw) patches; patch: patch size in pixels.
        average: ``"color"``: each group painted with the mean colour of all its pixels;
            ``"patch"``: each patch replaced by the mean of its group's patches (pixel by
            pixel, the seed's picture).
        seed: colour order.
    """
    if average not in ("color", "patch"):
        raise ValueError(f"average: expected 'color' or 'patch', got {average!r}")
    gh, gw = grid
    B = unit.shape[0]
    unit = unit[:, :, : gh * patch, : gw * patch].float().cpu()
    if source is None:
        source = torch.arange(gh * gw).expand(B, gh * gw)
    source = source.cpu().long()
    if tuple(source.shape) != (B, gh * gw):
        raise ValueError(f"source: expected shape (B, gh*gw) = ({B}, {gh * gw}), got {tuple(source.shape)}")
    # Relabel groups 0..G-1 per image, in order of first appearance (row-major): stable colours.
    groups = torch.empty_like(source)
    counts = []
    for b in range(B):
        _, first = np.unique(source[b].numpy(), return_index=True)
        order = source[b, np.sort(first)]
        lookup = torch.full((int(source[b].max()) + 1,), -1, dtype=torch.long)
        lookup[order] = torch.arange(len(order))
        groups[b] = lookup[source[b]]
        counts.append(len(order))
    G = max(counts)
    history = M.MergeHistory(groups, group_sizes(groups, G).clamp_min(1))

    # (B, 3, gh*p, gw*p) -> per patch (B, gh*gw, p, p, 3)
    patches = unit.permute(0, 2, 3, 1).reshape(B, gh, patch, gw, patch, 3)
    patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(B, gh * gw, patch, patch, 3)
    if average == "color":
        means = M.merge_original(history, patches.mean(dim=(2, 3)))  # (B, G, 3)
        per_patch = M.unmerge(groups, means)[:, :, None, None, :].expand_as(patches)
    else:
        means = M.merge_original(history, patches)  # (B, G, p, p, 3)
        per_patch = M.unmerge(groups, means)
    averaged = per_patch.reshape(B, gh, gw, patch, patch, 3).permute(0, 1, 3, 2, 4, 5)
    averaged = averaged.reshape(B, gh * patch, gw * patch, 3)

    colors = palette(G, seed)
    group_grid = groups.view(B, gh, gw).numpy()
    color_img = colors[group_grid]  # (B, gh, gw, 3)
    color_img = np.repeat(np.repeat(color_img, patch, axis=1), patch, axis=2)
    return Panels(
        original=_to_uint8(unit.permute(0, 2, 3, 1)),
        colors=np.ascontiguousarray(color_img),
        averaged=_to_uint8(averaged),
        groups=group_grid,
        outline=group_outline(group_grid, patch),
        num_groups=counts,
    )


def compose(
    panels: Panels,
    index: int,
    *,
    outlines: bool = True,
    titles: Sequence[str] | None = None,
    gap: int = 4,
    scale: int = 1,
):
    """One PIL image: the three panels of image ``index`` side by side (with ``titles`` above
    them when given), group outlines drawn on the two right panels when ``outlines``."""
    from PIL import Image, ImageDraw

    parts = [panels.original[index], panels.colors[index].copy(), panels.averaged[index].copy()]
    if outlines:
        edge = panels.outline[index]
        parts[1][edge] = (0, 0, 0)
        parts[2][edge] = (255, 255, 255)
    H, W = parts[0].shape[:2]
    header = 16 if titles else 0
    canvas = Image.new("RGB", (3 * W * scale + 2 * gap, H * scale + header), (255, 255, 255))
    for i, part in enumerate(parts):
        image = Image.fromarray(part)
        if scale != 1:
            image = image.resize((W * scale, H * scale), Image.NEAREST)
        canvas.paste(image, (i * (W * scale + gap), header))
    if titles:
        draw = ImageDraw.Draw(canvas)
        for i, title in enumerate(titles[:3]):
            draw.text((i * (W * scale + gap) + 2, 2), title, fill=(0, 0, 0))
    return canvas


def visualize(
    model,
    images: Sequence,
    r,
    *,
    outlines: bool = True,
    average: str = "color",
    titles: bool = True,
    seed: int = 0,
) -> list:
    """Run ``model`` (a :class:`tome.tools.models.vision.Model`) patched with the setting ``r`` (an ``r``
    schedule or a :class:`~tome.tools.schedule_text.Ratio`) on PIL images and return one composed
    PIL picture per image."""
    from tome.tools.schedule_text import setting_label

    unit = model.to_unit(images)
    model.set_r(r)
    outputs = model(_normalized(model, unit), saliency=False)
    panels = merge_panels(unit, outputs.source, model.grid, model.patch_size, average=average, seed=seed)
    n = model.num_patches
    result = []
    for i in range(len(images)):
        heading = None
        if titles:
            g = panels.num_groups[i]
            heading = (
                "original",
                f"{setting_label(r)}: {n} patches -> {g} groups",
                f"mean {average} per group",
            )
        result.append(compose(panels, i, outlines=outlines, titles=heading))
    return result


def _normalized(model, unit: torch.Tensor) -> torch.Tensor:
    from tome.tools.images import normalize

    return normalize(unit, model.mean, model.std)
