"""``tome viz --clip`` (issue 25 item 4): a clip's temporal + spatial groups as one strip of frames,
one colour per merged group for the whole clip, a red bar at each cut. Clips are made from the
photos bundled with the package (no ../shared), with a planted cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _cli_errors import one_error_line
from PIL import Image

from tome.cli.main import main
from tome.tools.data import demo_images
from tome.tools.pictures import vis_video
from tome.tools.pictures.vis_video import CUT_COLOR, GAP, draw_strip, frame_paths, strip_layout

pytest.importorskip("timm")

# 64 px, patch 16: 4 x 4 tokens per frame, each patch drawn 32 px (frames 128 px high).
TINY = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "64", "-q"]
GRID = (4, 4)


def _photo(index: int, shift: int = 0) -> Image.Image:
    """Bundled photo ``index`` as 256 x 256, its window moved ``shift`` px right (a pan)."""
    with Image.open(demo_images()[index]) as image:
        wide = image.convert("RGB").resize((288, 256))
    return wide.crop((shift, 0, shift + 256, 256))


def _clip(folder, frames: list[Image.Image]):
    folder.mkdir()
    for i, frame in enumerate(frames):
        frame.save(folder / f"frame{i + 1}.png")  # frame1 .. frameN: sorted by value, not as text
    return folder


def _cut_clip(tmp_path):
    """Astronaut twice, then coffee twice: a cut between frames 2 and 3."""
    return _clip(tmp_path / "cut", [_photo(0), _photo(0), _photo(2), _photo(2)])


def _row(picture: np.ndarray, layout, row: int, f: int) -> np.ndarray:
    y, x = layout.row_y(row), layout.frame_x(f)
    return picture[y : y + layout.frame_h, x : x + layout.frame_w]


def test_clip_strip_is_written_with_its_size_and_the_planted_cut(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["viz", "--clip", str(_cut_clip(tmp_path)), "--out", str(out), *TINY[:-1]]) == 0
    captured = capsys.readouterr()
    target = out / "cut_video0.9.png"
    assert captured.out.split() == [str(target)]
    assert "4 frames, 64 tokens -> 7 groups at video_ratio 0.9; cut between frames 2 and 3" in captured.err
    layout = strip_layout(4, GRID)
    picture = np.asarray(Image.open(target).convert("RGB"))
    assert picture.shape == (layout.size[1], layout.size[0], 3) == (420, 530, 3)
    below = slice(layout.header, None)
    assert (picture[below, layout.gap_x(2)] == CUT_COLOR).all()  # the cut, drawn over every row
    for f in (1, 3):
        assert (picture[below, layout.gap_x(f)] == 255).all()  # no cut: white
    # The still frames of each scene: the same colours (a group spans both frames) ...
    assert (_row(picture, layout, 1, 0) == _row(picture, layout, 1, 1)).all()
    assert (_row(picture, layout, 1, 2) == _row(picture, layout, 1, 3)).all()


def test_no_group_crosses_the_planted_cut(tmp_path):
    from tome.tools.models.loading import load_model

    model = load_model("timm:vit_tiny_patch16_224", random_init=True, img_size=64)
    frames = [_photo(0), _photo(0), _photo(2), _photo(2)]
    for ratio in (0.5, 0.9, 0.99):
        ((_, merged),) = vis_video.visualize_clip(model, frames, [ratio])
        assert merged.segments.tolist() == [0, 0, 1, 1]
        for group in range(merged.features.shape[0]):
            assert len(set(merged.segment_of_token[merged.source == group].tolist())) == 1


def test_a_still_clips_groups_span_its_frames():
    from tome.tools.models.loading import load_model

    model = load_model("timm:vit_tiny_patch16_224", random_init=True, img_size=64)
    frames = [_photo(1)] * 3
    ((picture, merged),) = vis_video.visualize_clip(model, frames, [0.75], titles=False)
    assert merged.segments.tolist() == [0, 0, 0]
    per_frame = merged.source.view(3, 16)
    assert torch.equal(per_frame[0], per_frame[1]) and torch.equal(per_frame[1], per_frame[2])
    assert merged.features.shape[0] == 12 and (merged.sizes >= 3).all()  # every group: >= 3 frames
    layout = strip_layout(3, GRID, titles=False)
    array = np.asarray(picture)
    assert picture.size == layout.size
    for row in range(3):
        assert (_row(array, layout, row, 0) == _row(array, layout, row, 2)).all()


def test_groups_are_coloured_across_frames_and_the_cut_bar_sits_between_segments():
    """draw_strip alone: a patch's colour is its group's, in whichever frame it is."""
    T, gh, gw, patch = 3, 2, 3, 4
    source = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 6, 3, 4, 7, 8, 9, 10, 11, 12, 13])
    unit = torch.rand(T, 3, gh * patch, gw * patch)
    picture = draw_strip(unit, source, torch.tensor([0, 0, 1]), (gh, gw), patch, frame_size=12, titles=False)
    layout = strip_layout(T, (gh, gw), 12, titles=False)
    array = np.asarray(picture).astype(int)
    p = layout.frame_h // gh
    centre = p // 2
    # The groups row with no frame under it: draw again on black frames to read the pure colours.
    black = draw_strip(torch.zeros_like(unit), source, torch.tensor([0, 0, 1]), (gh, gw), patch, frame_size=12,
                       titles=False, outlines=False)  # fmt: skip
    pure = np.asarray(black).astype(int)
    colour_of: dict[int, tuple] = {}
    for t in range(T):
        for i in range(gh):
            for j in range(gw):
                y = layout.row_y(1) + i * p + centre
                x = layout.frame_x(t) + j * p + centre
                colour = tuple(pure[y, x])
                assert colour_of.setdefault(int(source[t * gh * gw + i * gw + j]), colour) == colour
    assert len(set(colour_of.values())) == 14  # one colour per group
    assert (array[layout.header :, layout.gap_x(2)] == CUT_COLOR).all()
    assert (array[:, layout.gap_x(1)] == 255).all()
    assert layout.frame_x(1) - layout.frame_x(0) == layout.frame_w + GAP


def test_frames_are_sorted_by_name_with_numbers_by_value(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("f10.png", "f2.png", "f1.png", "notes.txt"):
        (folder / name).write_bytes(b"")
    (folder / "sub").mkdir()
    (folder / "sub" / "f0.png").write_bytes(b"")
    assert [p.name for p in frame_paths(folder)] == ["f1.png", "f2.png", "f10.png"]


def test_an_animated_gif_is_a_clip(tmp_path, capsys):
    gif = tmp_path / "clip.gif"
    frames = [_photo(0), _photo(0, 8), _photo(2)]  # GIF writers store a repeated frame once
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert [f.size for f in vis_video.read_clip(gif)] == [(256, 256)] * 3
    assert len(vis_video.read_clip(gif, limit=2)) == 2
    out = tmp_path / "out"
    assert main(["viz", "--clip", str(gif), "--video-ratio", "0.5,0.9", "--out", str(out), *TINY[:-1]]) == 0
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.png")) == ["clip_video0.5.png", "clip_video0.9.png"]
    assert err.count("cut between frames 2 and 3") == 2


def test_one_frame_is_spatial_only(tmp_path, capsys):
    clip = _clip(tmp_path / "one", [_photo(1)])
    out = tmp_path / "out"
    assert main(["viz", "--clip", str(clip), "--out", str(out), "--no-titles", *TINY[:-1]]) == 0
    assert "1 frame: spatial merging only" in capsys.readouterr().err
    with Image.open(out / "one_video0.9.png") as picture:
        assert picture.size == strip_layout(1, GRID, titles=False).size == (128, 392)


def test_limit_frame_size_and_scale(tmp_path):
    out = tmp_path / "out"
    args = ["--limit", "2", "--frame-size", "64", "--scale", "2", "--no-titles"]
    assert main(["viz", "--clip", str(_cut_clip(tmp_path)), "--out", str(out), *args, *TINY]) == 0
    with Image.open(out / "cut_video0.9.png") as picture:
        width, height = strip_layout(2, GRID, 64, titles=False).size
        assert picture.size == (2 * width, 2 * height)


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda tmp: _clip(tmp / "empty", []), [], "no frames"),
        (
            lambda tmp: _clip(tmp / "sizes", [_photo(0), _photo(0).resize((128, 128))]),
            [],
            "frames of different sizes: frame1.png is 256x256, frame2.png is 128x128",
        ),
        (lambda tmp: (tmp / "clip.mp4").write_bytes(b"\0") and tmp / "clip.mp4", [], "ffmpeg -i clip.mp4"),
        (lambda tmp: tmp / "missing", [], "no such file or folder"),
        (lambda tmp: (tmp / "x.gif").write_bytes(b"no") and tmp / "x.gif", [], "cannot read it as frames"),
        (
            _cut_clip,
            ["--video-ratio", "1"],
            "--video-ratio: expected a fraction of the clip's tokens in [0, 1)",
        ),
        (_cut_clip, ["--video-ratio", "0.5,x"], "got 'x'"),
        (_cut_clip, ["--r", "4"], "--r: not with --clip"),
        (_cut_clip, ["--timestep", "3"], "--timestep: not with --clip"),
        (_cut_clip, ["--model", "diffusers:sd/"], "--clip runs ViTs"),
        (_cut_clip, ["--frame-size", "0"], "--frame-size must be >= 1"),
    ],
)
def test_bad_clips_fail_before_the_model_loads(make, extra, message, tmp_path, capsys, monkeypatch):
    import tome.cli.viz as viz

    def no_loading(args):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(viz, "load", no_loading)
    path = make(tmp_path)
    assert main(["viz", "--clip", str(path), "--out", str(tmp_path / "o"), *TINY, *extra]) == 2
    assert message in one_error_line(capsys)


def test_an_unreadable_frame_is_an_error_not_a_skip(tmp_path, capsys):
    clip = _clip(tmp_path / "broken", [_photo(0), _photo(0)])
    (clip / "frame2.png").write_bytes(b"garbage")
    assert main(["viz", "--clip", str(clip), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "cannot read frame frame2.png" in one_error_line(capsys)


def test_clip_flags_need_clip(tmp_path, capsys):
    photo = str(demo_images()[0])
    for extra in (["--video-ratio", "0.5"], ["--frame-size", "64"]):
        assert main(["viz", photo, "--out", str(tmp_path / "o"), *extra, *TINY]) == 2
        assert "only with --clip" in one_error_line(capsys)


def test_the_parsers_copies_are_the_tools():
    import tome.cli.viz as viz

    assert viz.DEFAULT_VIDEO_RATIO == vis_video.DEFAULT_VIDEO_RATIO
    assert viz.DEFAULT_FRAME_SIZE == vis_video.DEFAULT_FRAME_SIZE


@pytest.mark.slow
def test_real_dinov2_finds_the_cut_of_a_pan(tmp_path, dinov2_dir, capsys):
    """The real DINOv2-S (the default model's weights): two 2-frame pans, a cut between."""
    clip = _clip(tmp_path / "pan", [_photo(0), _photo(0, 16), _photo(2), _photo(2, 16)])
    out = tmp_path / "out"
    assert main(["viz", "--clip", str(clip), "--out", str(out), "--model", f"hf:{dinov2_dir}", "-q"]) == 0
    picture = np.asarray(Image.open(out / "pan_video0.9.png").convert("RGB"))
    layout = strip_layout(4, (16, 16))
    assert picture.shape == (layout.size[1], layout.size[0], 3)
    assert (picture[layout.header :, layout.gap_x(2)] == CUT_COLOR).all()
    assert (picture[layout.header :, layout.gap_x(1)] == 255).all()
    assert (picture[layout.header :, layout.gap_x(3)] == 255).all()
