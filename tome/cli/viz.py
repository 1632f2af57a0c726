"""``tome viz``: pictures of the merged groups, one PNG per image and setting (ViTs, and diffusion
models with ``--model diffusers:FOLDER``), or with ``--clip`` one strip per video clip and
``--video-ratio`` (the video merge of the vision-language models, on the ViT's tokens per frame)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from tome.cli.common import check_vision_model, images, info, load, readable, set_threads, warn, writable_dir
from tome.cli.flags import (
    EPILOG_DIFFUSERS,
    EPILOG_MODELS,
    add_command,
    add_model_args,
    add_schedule_args,
    flag,
    given_flags,
    positive,
    settings,
)
from tome.tools.errors import UserError

# --clip's defaults, copies of tome.tools.pictures.vis_video's (parsing imports no torch;
# tests/test_vis_video.py checks them)
DEFAULT_VIDEO_RATIO = 0.9
DEFAULT_FRAME_SIZE = 128

# viz's flags for diffusers: models, and their tome.patch names (None: not given)
DIFFUSION_FLAGS = {
    "block": None, "timestep": None, "seed": "seed", "vae": None, "sx": "sx", "sy": "sy",
    "max_downsample": "max_downsample", "use_rand": "use_rand", "merge_crossattn": "merge_crossattn",
    "merge_mlp": "merge_mlp",
}  # fmt: skip


_HELP = "pictures of the merged groups (ViTs, diffusion models, video clips)"
_DESCRIPTION = (
    "For every image, one PNG with three panels: the image as the model sees it, every "
    "merged group in its own colour, and the pixels averaged per group. A diffusion model "
    "(--model diffusers:FOLDER) draws one block's groups on its latent grid, for the photo encoded by "
    "the VAE and noised to --timestep, with zero text conditioning. With --clip, each input is a "
    "video clip (a folder of frames, sorted by name, or an animated GIF / WebP / PNG): one PNG per "
    "clip and --video-ratio, a strip of its frames: the frames, the groups of the video merge "
    "(across frames, then inside each frame of each scene; one colour per group for the whole clip) "
    "over them, and the pixels averaged per group; a red bar between two frames marks a cut."
)
_EXAMPLES = """\
  tome viz photo.jpg
  tome viz photos/ --r 8,16 --out pictures/ --model timm:vit_base_patch16_224
  tome viz photos/ --average patch --no-outlines
  tome viz photos/ --model diffusers:sd15/ --ratio 0.5 --timestep 500   # a pipeline folder
  tome viz photos/ --model diffusers:unet/ --vae vae/ --block 1 --sx 4 --sy 4
  tome viz --clip frames/ --video-ratio 0.9 --out pictures/   # frames/0001.png, 0002.png, ...
  tome viz --clip clip.gif --video-ratio 0.5,0.9 --limit 16
"""


def add_parser(subparsers) -> None:
    viz = add_command(subparsers, "viz", _HELP, _DESCRIPTION, _EXAMPLES, EPILOG_MODELS + EPILOG_DIFFUSERS)
    viz.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="images or folders (searched recursively); with --clip: clips",
    )
    add_schedule_args(viz, "16", "; several give one PNG each")
    viz.add_argument("--out", default="tome-viz", metavar="DIR", help="output folder (default: ./tome-viz)")
    viz.add_argument("--batch", type=int, default=8, help="images per forward pass (default: 8)")
    viz.add_argument(
        "--limit", type=int, metavar="N", help="only the first N images (--clip: frames of each clip)"
    )
    viz.add_argument(
        "--average",
        choices=("color", "patch"),
        default="color",
        help="right panel: mean colour "
        "of each group (default) or each patch replaced by its group's mean patch",
    )
    viz.add_argument("--no-outlines", action="store_true", help="do not draw group outlines")
    viz.add_argument("--no-titles", action="store_true", help="no captions above the panels")
    viz.add_argument("--scale", type=int, default=1, help="enlarge the PNGs by this integer factor")
    _add_clip_args(viz)
    _add_diffusion_args(viz)
    add_model_args(viz)
    viz.set_defaults(func=run)


def _add_clip_args(parser: argparse.ArgumentParser) -> None:
    """viz's options for video clips (None: not given; --video-ratio's default comes with --clip)."""
    group = parser.add_argument_group("video clips (--clip)")
    group.add_argument(
        "--clip", action="store_true", help="each input is one clip: a folder's own image files (its frames, "
        "sorted by name, numbers by value; all of one size) or an animated GIF / WebP / PNG; video files: "
        "extract the frames first (ffmpeg -i clip.mp4 frames/%%04d.png)",
    )  # fmt: skip
    group.add_argument(
        "--video-ratio", metavar="P", help=f"the fraction of the clip's tokens merged away, in [0, 1); several "
        f"(0.5,0.9) give one PNG each (default: {DEFAULT_VIDEO_RATIO})",
    )  # fmt: skip
    group.add_argument(
        "--frame-size", type=int, metavar="PX", help=f"about how many pixels high each frame is drawn "
        f"(default: {DEFAULT_FRAME_SIZE})",
    )  # fmt: skip


def _add_diffusion_args(parser: argparse.ArgumentParser) -> None:
    """viz's options for ``--model diffusers:FOLDER`` (None: the default, refused for ViTs)."""
    group = parser.add_argument_group("diffusion models (--model diffusers:FOLDER; --ratio, default 0.5)")
    group.add_argument(
        "--block", metavar="B", help="the block drawn: its index in model.tome.blocks or its module name "
        "(default: the first block that merges)",
    )  # fmt: skip
    group.add_argument(
        "--timestep", type=int, metavar="T", help="noise the photo's latents to this timestep of the "
        "model's 1000 (default: 500; small: the photo, large: mostly noise)",
    )  # fmt: skip
    group.add_argument(
        "--seed", type=int, metavar="S", help="seed of the noise, the same for every photo (and of --use-rand) "
        "(default: 0)",
    )  # fmt: skip
    group.add_argument(
        "--vae", metavar="FOLDER", help="the VAE that encodes the photos: a VAE folder or a pipeline folder "
        "(default: the pipeline's; needed for a bare denoiser folder)",
    )  # fmt: skip
    group.add_argument("--sx", type=int, metavar="N", help="tomesd's destination stride across (default: 2)")
    group.add_argument("--sy", type=int, metavar="N", help="tomesd's destination stride down (default: 2)")
    group.add_argument(
        "--max-downsample", type=int, choices=(1, 2, 4, 8), help="UNets: blocks at most this much "
        "downsampled merge (default: 1; SDXL needs 2)",
    )  # fmt: skip
    group.add_argument(
        "--use-rand", action="store_true", help="a random destination per cell, as tomesd by default (here: "
        "the top-left one, the same picture for any batch)",
    )  # fmt: skip
    group.add_argument("--merge-crossattn", action="store_true", help="cross-attention merges too")
    group.add_argument("--merge-mlp", action="store_true", help="the feed-forward merges too")


def run(args) -> int:
    from tome.tools.pictures.vis_diffusion import is_diffusers_spec

    if args.clip:
        return run_clips(args)
    clip_only = given_flags(args, ("video_ratio", "frame_size"))
    if clip_only:
        raise UserError(f"{flag(clip_only[0])}: only with --clip (the inputs are video clips)")
    diffusion = is_diffusers_spec(args.model)
    if not diffusion:
        extra = given_flags(args, DIFFUSION_FLAGS)
        if extra:
            raise UserError(f"{flag(extra[0])}: only for diffusion models (--model diffusers:FOLDER)")
        check_vision_model(args)
    rs = _diffusion_settings(args) if diffusion else settings(args)
    positive("--batch", args.batch)
    positive("--scale", args.scale)
    out = writable_dir(args.out)
    paths = images(args.inputs, args.limit)
    readable(paths, check_only=True)  # no image at all is an error before the model loads
    if diffusion:
        model, draw = None, _diffusion_draw(args)
    else:
        model, draw = load(args), None
    start = time.perf_counter()
    written = draw_pictures(model, paths, rs, out, args, draw=draw)
    info(args, f"{len(written)} picture(s) in {time.perf_counter() - start:.1f}s")
    for path in written:
        print(path)
    return 0


def draw_pictures(model, paths: Sequence[Path], rs, out: Path, args, *, draw=None) -> list[Path]:
    """Write one PNG per image and setting. ``draw(images, r) -> (pictures, file tag)``
    makes the pictures (default: :func:`tome.tools.pictures.vis.visualize` on the ViT ``model``)."""
    from tome.tools.images import open_image
    from tome.tools.pictures.vis import visualize
    from tome.tools.progress import progress_bar
    from tome.tools.schedule_text import Ratio, file_label

    if draw is None:

        def draw(images, r):
            pictures = visualize(
                model,
                images,
                r,
                outlines=not args.no_outlines,
                average=args.average,
                titles=not args.no_titles,
            )
            return pictures, f"{'' if isinstance(r, Ratio) else 'r'}{file_label(r)}"

    written: list[Path] = []
    used: set[str] = set()
    skipped = 0
    batches = [paths[i : i + args.batch] for i in range(0, len(paths), args.batch)]
    bar = progress_bar(len(batches) * len(rs), not args.quiet, "viz")
    for chunk in batches:
        loaded = []
        for path in chunk:
            image = open_image(path)
            if image is None:
                warn(f"skipped {path}: cannot read it as an image")
                skipped += 1
            else:
                loaded.append((path, image))
        for r in rs:
            bar.update(1)
            if not loaded:
                continue
            pictures, tag = draw([image for _, image in loaded], r)
            for (path, _), picture in zip(loaded, pictures, strict=True):
                name = f"{path.stem}_{tag}"
                stem, k = name, 1
                while name in used:
                    k += 1
                    name = f"{stem}-{k}"
                used.add(name)
                if args.scale != 1:
                    size = (picture.width * args.scale, picture.height * args.scale)
                    picture = picture.resize(size, resample=0)  # nearest: keep patch edges sharp
                target = out / f"{name}.png"
                try:
                    picture.save(target)
                except OSError as error:
                    raise UserError(f"cannot write {target}: {error.strerror or error}") from None
                written.append(target)
    bar.close()
    if skipped:
        warn(f"{skipped} unreadable image(s) skipped")
    if not written:
        raise UserError("no readable images")
    return written


def video_ratios(text: str) -> list[float]:
    """``--video-ratio``: one fraction or several, comma-separated, each in [0, 1)."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = None
        if value is None or not 0 <= value < 1:
            raise UserError(
                f"--video-ratio: expected a fraction of the clip's tokens in [0, 1) (or several: 0.5,0.9), "
                f"got {part.strip()!r}"
            )
        values.append(value)
    return values


def run_clips(args) -> int:
    """``tome viz --clip``: one strip per clip and ``--video-ratio`` (ViTs only)."""
    from tome.tools.pictures.vis_diffusion import is_diffusers_spec
    from tome.tools.pictures.vis_video import describe_cuts, read_clip, visualize_clip

    refused = given_flags(args, ("r", "ratio", *DIFFUSION_FLAGS))
    if refused:
        raise UserError(
            f"{flag(refused[0])}: not with --clip (the clip is merged by --video-ratio, on the model's "
            "unmerged tokens of each frame)"
        )
    if is_diffusers_spec(args.model):
        raise UserError(f"--model {args.model}: --clip runs ViTs (a diffusion model draws photos, not clips)")
    check_vision_model(args)
    ratios = video_ratios(str(DEFAULT_VIDEO_RATIO) if args.video_ratio is None else args.video_ratio)
    positive("--batch", args.batch)
    positive("--scale", args.scale)
    frame_size = positive("--frame-size", DEFAULT_FRAME_SIZE if args.frame_size is None else args.frame_size)
    limit = None if args.limit is None else positive("--limit", args.limit)
    out = writable_dir(args.out)
    clips = [
        (Path(path), read_clip(path, limit)) for path in args.inputs
    ]  # every error before the model loads
    model = load(args)
    start = time.perf_counter()
    written: list[Path] = []
    used: set[str] = set()
    for path, frames in clips:
        if len(frames) == 1:
            info(args, f"{path}: 1 frame: spatial merging only")
        drawn = visualize_clip(
            model, frames, ratios, batch=args.batch, frame_size=frame_size, outlines=not args.no_outlines,
            average=args.average, titles=not args.no_titles,
        )  # fmt: skip
        for ratio, (picture, merged) in zip(ratios, drawn, strict=True):
            info(
                args,
                f"{path}: {len(frames)} frames, {merged.source.shape[0]} tokens -> {merged.features.shape[0]} "
                f"groups at video_ratio {ratio:g}; {describe_cuts(merged.segments)}",
            )
            name = stem = f"{path.stem or 'clip'}_video{ratio:g}"
            k = 1
            while name in used:
                k += 1
                name = f"{stem}-{k}"
            used.add(name)
            if args.scale != 1:
                picture = picture.resize(
                    (picture.width * args.scale, picture.height * args.scale), resample=0
                )
            target = out / f"{name}.png"
            try:
                picture.save(target)
            except OSError as error:
                raise UserError(f"cannot write {target}: {error.strerror or error}") from None
            written.append(target)
    info(args, f"{len(written)} picture(s) in {time.perf_counter() - start:.1f}s")
    for target in written:
        print(target)
    return 0


def _diffusion_settings(args) -> list:
    """``--ratio`` for a diffusion model (default tomesd's 0.5); ``--r`` is refused."""
    from tome.tools.pictures.vis_diffusion import DEFAULT_RATIO
    from tome.tools.schedule_text import parse_ratio

    if args.r is not None:
        raise UserError(
            f"--r: a diffusion model merges a fraction of every merging block's tokens (tomesd's ratio); "
            f"give --ratio (default {DEFAULT_RATIO})"
        )
    return parse_ratio(args.ratio if args.ratio is not None else str(DEFAULT_RATIO))


def _diffusion_draw(args):
    """Load ``--model diffusers:FOLDER`` and return viz's ``draw`` for it."""
    from tome.tools.pictures.vis_diffusion import DEFAULT_TIMESTEP, load_diffusion, visualize_diffusion
    from tome.tools.schedule_text import Ratio, file_label

    weights = given_flags(args, ("weights", "random_init"))
    if weights:
        raise UserError(f"{flag(weights[0])}: not for diffusers: models (the folder holds the weights)")
    set_threads(args)
    model = load_diffusion(args.model, vae=args.vae, img_size=args.img_size)
    info(args, f"model: {model.describe()}")
    options = {k: getattr(args, a) for a, k in DIFFUSION_FLAGS.items() if k and getattr(args, a) is not None}
    timestep = DEFAULT_TIMESTEP if args.timestep is None else args.timestep
    told: set[int] = set()

    def draw(images, ratio):
        value = ratio.value if isinstance(ratio, Ratio) else float(ratio)
        pictures, block = visualize_diffusion(
            model, images, value, block=args.block, timestep=timestep, seed=args.seed or 0, options=options,
            outlines=not args.no_outlines, average=args.average, titles=not args.no_titles,
        )  # fmt: skip
        if block not in told:
            told.add(block)
            info(args, f"block {block}: {model.denoiser.tome.blocks[block]}")
        return pictures, f"{file_label(ratio)}_block{block}"

    return draw
