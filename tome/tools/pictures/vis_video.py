"""Pictures of a video's temporal + spatial groups (``tome viz --clip``): one strip of frames.

A clip (a folder of frames, or an animated GIF / WebP / PNG / multi-page TIFF) runs frame by frame
through a vision model (the patch tokens of its last layer, unmerged, RMS-normalised as in
``benchmarks/video_fidelity.py``), and the ``(T frames, S tokens, D)`` features are merged by the
video language models' own merge, :func:`tome.adapters.common.video.merge_video` (cuts, temporal
runs, spatial merging inside each frame of each scene), at ``video_ratio``. One frame is one
temporal group here (Qwen reads two frames per group).

The picture (:func:`draw_strip`), frames left to right, three rows:

1. the frames as the model sees them (resized, cropped as for images), downscaled;
2. every merged group in its own colour over the frame, one colour per group for the whole
   clip (a still region merged over several frames has the same colour in each of them),
   black outlines between groups;
3. the pixels averaged per group (its mean colour, or with ``average="patch"`` its mean patch),
   across every frame the group covers.

A red bar between two frames marks a cut: the second frame starts a new segment (a scene), and
no group crosses it.

>>> g = torch.Generator().manual_seed(0)
>>> unit = torch.rand(3, 3, 32, 32, generator=g)  # 3 frames of 4 x 4 patches of 8 px
>>> source = torch.arange(48) % 16  # a still clip: each place one group over all 3 frames
>>> picture = draw_strip(unit, source, torch.tensor([0, 0, 1]), (4, 4), 8, frame_size=16, titles=False)
>>> picture.size == strip_layout(3, (4, 4), 16, titles=False).size
True
>>> picture.getpixel((strip_layout(3, (4, 4), 16, titles=False).gap_x(2), 20))  # the cut's bar
(220, 0, 0)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tome.adapters.common.video import MergedVideo, kept_video_tokens, merge_video
from tome.tools.errors import UserError
from tome.tools.images import IMAGE_EXTENSIONS, open_image
from tome.tools.pictures.vis import group_outline, palette

__all__ = [
    "CUT_COLOR",
    "DEFAULT_FRAME_SIZE",
    "DEFAULT_VIDEO_RATIO",
    "VIDEO_EXTENSIONS",
    "StripLayout",
    "clip_features",
    "cut_frames",
    "describe_cuts",
    "draw_strip",
    "frame_paths",
    "merge_clip",
    "natural_key",
    "read_clip",
    "strip_layout",
    "visualize_clip",
]

# tome viz --clip's default: the ratio the call uses (tome.patch's own default is 0.75).
DEFAULT_VIDEO_RATIO = 0.9
DEFAULT_FRAME_SIZE = 128  # pixels per side of each drawn frame (about; a whole number per patch)
CUT_COLOR = (220, 0, 0)
GAP = 6  # pixels between two frames: white, or the cut's red bar
ROW_GAP = 4
LINE = 12  # one caption line
ROWS = 3
ALPHA = 0.6  # the group colours' weight over the frame
# Video files Pillow cannot decode; tome depends on no video decoder (frames: ffmpeg, see below).
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp")


# -- reading a clip ---------------------------------------------------------------------------------


def natural_key(name: str) -> list:
    """Sort key: by name, runs of digits by value (``frame2`` before ``frame10``).

    >>> sorted(["f10.png", "f2.png", "F1.png"], key=natural_key)
    ['F1.png', 'f2.png', 'f10.png']
    """
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)
    ]


def frame_paths(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (not in its subfolders), sorted by
    :func:`natural_key`."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: natural_key(p.name))


def _animation(path: Path, limit: int | None) -> list:
    """Every frame of an image file (one for a still image), RGB; None if Pillow cannot read it."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            frames = []
            for frame in ImageSequence.Iterator(image):
                frames.append(frame.convert("RGB"))
                if limit is not None and len(frames) >= limit:
                    break
            return frames
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def read_clip(path: str | Path, limit: int | None = None) -> list:
    """A clip's frames as RGB PIL images, at most ``limit``: a folder's image files (see
    :func:`frame_paths`), or an image file's frames as stored (an animated GIF / WebP / PNG, a
    multi-page TIFF; a frame shown for longer counts once; a still image is a clip of one frame). Every frame must decode and all must have the
    first frame's size (a clip whose frames differ is refused, never resized: mixed sizes mean
    mixed sources). Raises :class:`UserError` saying what is wrong.

    >>> from tome.tools.data import demo_images
    >>> [frame.size for frame in read_clip(demo_images()[0])]
    [(400, 400)]
    """
    path = Path(path).expanduser()
    if path.is_dir():
        paths = frame_paths(path)
        if not paths:
            raise UserError(
                f"--clip {path}: no frames (a clip is a folder's own image files, sorted by name: "
                f"{', '.join(IMAGE_EXTENSIONS)})"
            )
        paths = paths[:limit] if limit is not None else paths
        frames = []
        for frame_path in paths:
            image = open_image(frame_path)
            if image is None:
                raise UserError(f"--clip {path}: cannot read frame {frame_path.name} as an image")
            frames.append(image)
        names = [p.name for p in paths]
    elif path.is_file():
        if path.suffix.lower() in VIDEO_EXTENSIONS:
            raise UserError(
                f"--clip {path}: video files need a decoder tome does not depend on; extract the frames "
                f"first (ffmpeg -i {path.name} -vf fps=2 frames/%04d.png) and give the folder, or give an "
                f"animated GIF / WebP / PNG"
            )
        frames = _animation(path, limit)
        if not frames:
            raise UserError(f"--clip {path}: cannot read it as frames (an image folder or an animated image)")
        names = [f"frame {i}" for i in range(len(frames))]
    else:
        raise UserError(f"--clip {path}: no such file or folder")
    first = frames[0].size
    for name, frame in zip(names, frames, strict=True):
        if frame.size != first:
            raise UserError(
                f"--clip {path}: frames of different sizes: {names[0]} is {first[0]}x{first[1]}, {name} is "
                f"{frame.size[0]}x{frame.size[1]} (a clip's frames must share one size)"
            )
    return frames


# -- features and merging ---------------------------------------------------------------------------


def clip_features(model, frames: Sequence, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the vision model (a :class:`tome.tools.models.vision.Model`, unpatched) on the frames,
    ``batch`` at a time. Returns the frames as the model saw them ``(T, 3, H, W)`` in [0, 1] and
    their patch tokens ``(T, S, D)`` float32, RMS-normalised (as ``benchmarks/video_fidelity.py``,
    on which the merge's thresholds were chosen)."""
    from tome.tools.images import normalize

    if model.patched:
        model.set_r(None)  # the model's own tokens: the video merge comes after the vision tower
    units, tokens = [], []
    for i in range(0, len(frames), batch):
        unit = model.to_unit(frames[i : i + batch])
        units.append(unit)
        tokens.append(model(normalize(unit, model.mean, model.std), saliency=False).patches.float())
    x = torch.cat(tokens)
    return torch.cat(units), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def merge_clip(features: torch.Tensor, video_ratio: float) -> MergedVideo:
    """``(T, S, D)`` -> :func:`~tome.adapters.common.video.merge_video` of its ``T * S`` tokens,
    keeping :func:`~tome.adapters.common.video.kept_video_tokens` of them (one frame: spatial only).

    >>> still = torch.randn(1, 4, 8).expand(3, 4, 8)
    >>> out = merge_clip(still, 0.5)
    >>> out.features.shape[0], out.segments.tolist()
    (6, [0, 0, 0])
    """
    T, S, D = features.shape
    return merge_video(features.reshape(T * S, D), T, kept_video_tokens(T * S, video_ratio))


# -- drawing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StripLayout:
    """Where things are in a strip: ``frames`` frames of ``frame_w`` x ``frame_h`` pixels, ``GAP``
    apart, ``ROWS`` rows ``ROW_GAP`` apart, below a caption ``header`` pixels high."""

    frames: int
    frame_h: int
    frame_w: int
    header: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the picture (before any caption wider than the frames)."""
        width = self.frames * self.frame_w + (self.frames - 1) * GAP
        return width, self.header + ROWS * self.frame_h + (ROWS - 1) * ROW_GAP

    def frame_x(self, f: int) -> int:
        """Left column of frame ``f``."""
        return f * (self.frame_w + GAP)

    def row_y(self, row: int) -> int:
        """Top line of row ``row`` (0: frames, 1: groups, 2: averaged)."""
        return self.header + row * (self.frame_h + ROW_GAP)

    def gap_x(self, f: int) -> int:
        """The middle column of the gap before frame ``f`` (``f >= 1``)."""
        return self.frame_x(f) - GAP // 2


def strip_layout(
    frames: int, grid: tuple[int, int], frame_size: int = DEFAULT_FRAME_SIZE, *, titles: bool = True
):
    """The :class:`StripLayout` of ``frames`` frames of a ``grid`` of patches drawn about
    ``frame_size`` pixels high (a whole number of pixels per patch, at least 1).

    >>> strip_layout(4, (16, 16)).size
    (530, 420)
    """
    per_patch = _per_patch(grid, frame_size)
    return StripLayout(frames, grid[0] * per_patch, grid[1] * per_patch, 2 * LINE + 4 if titles else 0)


def _per_patch(grid: tuple[int, int], frame_size: int) -> int:
    return max(1, round(frame_size / grid[0]))


def draw_strip(
    unit: torch.Tensor,
    source: torch.Tensor,
    segments: torch.Tensor,
    grid: tuple[int, int],
    patch: int,
    *,
    frame_size: int = DEFAULT_FRAME_SIZE,
    outlines: bool = True,
    average: str = "color",
    titles: bool = True,
    caption: Sequence[str] = (),
    seed: int = 0,
):
    """The strip (a PIL image) of one clip.

    Args:
        unit: ``(T, 3, H, W)`` the frames in [0, 1] as the model saw them (``H >= gh * patch``).
        source: ``(T * gh * gw,)`` the merged group of every patch of every frame (frame, row,
            column order), groups numbered ``0..k-1``, as :class:`MergedVideo.source`.
        segments: ``(T,)`` the segment of every frame; a frame whose segment differs from the one
            before gets a red bar before it.
        grid: ``(gh, gw)`` patches per frame; patch: patch size in pixels.
        frame_size: about how many pixels high each frame is drawn.
        average: the third row: each group's mean ``"color"`` or mean ``"patch"``.
        titles: the ``caption`` lines (two at most) above the frames.
        seed: the order of the colours.
    """
    from PIL import Image, ImageDraw

    if average not in ("color", "patch"):
        raise ValueError(f"average: expected 'color' or 'patch', got {average!r}")
    T = unit.shape[0]
    gh, gw = grid
    S = gh * gw
    source = source.cpu().long()
    if tuple(source.shape) != (T * S,):
        raise ValueError(f"source: expected shape (T*gh*gw,) = ({T * S},), got {tuple(source.shape)}")
    if tuple(segments.shape) != (T,):
        raise ValueError(f"segments: expected shape (T,) = ({T},), got {tuple(segments.shape)}")
    layout = strip_layout(T, grid, frame_size, titles=titles)
    p = _per_patch(grid, frame_size)
    # The frames at p pixels per patch (antialiased: a downscale), (T, h, w, 3) in [0, 1].
    view = unit[:, :, : gh * patch, : gw * patch].float().cpu()
    small = F.interpolate(view, size=(gh * p, gw * p), mode="bilinear", antialias=True, align_corners=False)
    small = small.clamp(0, 1).permute(0, 2, 3, 1)
    k = int(source.max()) + 1
    groups = source.view(T, gh, gw).numpy()
    colors = palette(k, seed)[groups].astype(np.float32) / 255  # (T, gh, gw, 3)
    colors = np.repeat(np.repeat(colors, p, axis=1), p, axis=2)
    overlay = (1 - ALPHA) * small.numpy() + ALPHA * colors
    # Row 3: each group's mean over all the patches (of every frame) it holds.
    tiles = small.reshape(T, gh, p, gw, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(T * S, p, p, 3)
    if average == "color":
        tiles = tiles.mean(dim=(1, 2), keepdim=True).expand_as(tiles)
    sizes = torch.bincount(source, minlength=k).float()
    means = torch.zeros(k, p, p, 3).index_add_(0, source, tiles.contiguous()) / sizes[:, None, None, None]
    averaged = (
        means[source].reshape(T, gh, gw, p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(T, gh * p, gw * p, 3)
    )
    rows = [_uint8(small.numpy()), _uint8(overlay), _uint8(averaged.numpy())]
    if outlines:
        edge = group_outline(groups, p)
        rows[1][edge] = (0, 0, 0)
        rows[2][edge] = (255, 255, 255)
    width, height = layout.size
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        y = layout.row_y(r)
        for f in range(T):
            x = layout.frame_x(f)
            canvas[y : y + layout.frame_h, x : x + layout.frame_w] = row[f]
    for f in cut_frames(segments):
        x = layout.frame_x(f) - GAP
        canvas[layout.header :, x : x + GAP] = CUT_COLOR
    picture = Image.fromarray(canvas)
    if titles and caption:
        lines = list(caption)[:2]
        draw = ImageDraw.Draw(picture)
        wide = max(int(draw.textlength(line)) for line in lines) + 4
        if wide > width:  # a caption wider than the frames: a wider canvas, frames on the left
            wider = Image.new("RGB", (wide, height), (255, 255, 255))
            wider.paste(picture, (0, 0))
            picture, draw = wider, ImageDraw.Draw(wider)
        for i, line in enumerate(lines):
            draw.text((2, 2 + i * LINE), line, fill=(0, 0, 0))
    return picture


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8))


def cut_frames(segments: torch.Tensor) -> list[int]:
    """The frames (counted from 0) that start a new segment: a cut just before each.

    >>> cut_frames(torch.tensor([0, 0, 1, 1, 2]))
    [2, 4]
    """
    s = segments.tolist()
    return [f for f in range(1, len(s)) if s[f] != s[f - 1]]


def describe_cuts(segments: torch.Tensor) -> str:
    """The cuts in words, frames counted from 1 as a user numbers them.

    >>> describe_cuts(torch.tensor([0, 0, 1, 1, 2])), describe_cuts(torch.tensor([0, 0]))
    ('cuts between frames 2-3, 4-5', 'no cut')
    """
    cuts = cut_frames(segments)
    if not cuts:
        return "no cut"
    if len(cuts) == 1:
        return f"cut between frames {cuts[0]} and {cuts[0] + 1}"
    return "cuts between frames " + ", ".join(f"{f}-{f + 1}" for f in cuts)


def _caption(merged: MergedVideo, frames: int, video_ratio: float) -> list[str]:
    n = merged.source.shape[0]
    first = f"{frames} frames x {n // frames} tokens = {n} -> {merged.features.shape[0]} groups"
    if frames == 1:
        return [first, f"video_ratio {video_ratio:g}; 1 frame: spatial merging only"]
    return [first, f"video_ratio {video_ratio:g}; {describe_cuts(merged.segments)}"]


def visualize_clip(
    model,
    frames: Sequence,
    video_ratios: Sequence[float],
    *,
    batch: int = 8,
    frame_size: int = DEFAULT_FRAME_SIZE,
    outlines: bool = True,
    average: str = "color",
    titles: bool = True,
    seed: int = 0,
) -> list[tuple[object, MergedVideo]]:
    """Run ``model`` (:class:`tome.tools.models.vision.Model`) on the clip's frames (PIL images
    of one size) once, merge at every ratio of ``video_ratios``, and return ``(picture,
    merged)`` per ratio: the strip (:func:`draw_strip`) and the :class:`MergedVideo`
    (``merged.segments``: the scenes found)."""
    unit, features = clip_features(model, frames, batch)
    result = []
    for ratio in video_ratios:
        merged = merge_clip(features, ratio)
        picture = draw_strip(
            unit, merged.source, merged.segments, model.grid, model.patch_size, frame_size=frame_size,
            outlines=outlines, average=average, titles=titles, caption=_caption(merged, len(frames), ratio),
            seed=seed,
        )  # fmt: skip
        result.append((picture, merged))
    return result
