"""What several ``tome`` commands do when they run: messages on stderr, loading a vision model,
finding and checking images, checking output paths, printing results.

Light at module level (the standard library and :mod:`tome.tools.errors`); torch and the tools
are imported inside the functions, which only run after the arguments are parsed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tome.cli.flags import DEFAULT_MODEL
from tome.tools.errors import UserError


def warn(message: str) -> None:
    print(f"tome: warning: {message}", file=sys.stderr)


def info(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def warn_notes(model) -> None:
    """The loaded model's notes (e.g. weights it lacks), one warning each."""
    for note in model.notes:
        warn(f"{model.name}: {note}")


def set_threads(args) -> None:
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def check_vision_model(args) -> None:
    """``--model`` (default: :data:`~tome.cli.flags.DEFAULT_MODEL`) must name a ViT: a text or
    diffusion model is refused (before the inputs are read)."""
    from tome.tools.models.text_loading import is_text_spec
    from tome.tools.pictures.vis_diffusion import is_diffusers_spec

    if args.model is None:
        args.model = DEFAULT_MODEL
    if is_text_spec(args.model):
        raise UserError(
            f"--model {args.model}: tome {args.command} runs vision models; text models work with "
            "tome bench and tome eval (--texts FILE)"
        )
    if is_diffusers_spec(args.model):
        raise UserError(
            f"--model {args.model}: tome {args.command} runs ViTs; diffusion models work with tome viz"
        )


def load(args, *, describe: bool = True):
    """The vision model of ``--model``, checked by :func:`check_vision_model`."""
    from tome.tools.models.loading import load_model

    check_vision_model(args)
    set_threads(args)
    model = load_model(
        args.model,
        weights=args.weights,
        random_init=args.random_init,
        img_size=args.img_size,
        log=lambda line: info(args, line),
    )
    warn_notes(model)
    if describe:
        info(args, f"model: {model.describe()}")
    return model


# -- output paths ------------------------------------------------------------------------------


def writable_dir(path: str | Path) -> Path:
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".tome-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to {out}: {error.strerror or error}") from None
    return out


def writable_file(path: str | Path) -> Path:
    file = Path(path).expanduser()
    if file.is_dir():
        raise UserError(f"{file} is a folder; expected a file name")
    writable_dir(file.parent if str(file.parent) else ".")
    return file


def plot_file(path: str | None) -> Path | None:
    """``--plot FILE`` checked before the work: a file that can be written, and matplotlib."""
    if path is None:
        return None
    file = writable_file(path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'tome-merging[vis]'") from None
    return file


# -- images ------------------------------------------------------------------------------------


def images(inputs: Sequence[str], limit: int | None = None) -> list[Path]:
    """The image files of ``inputs`` (files, folders searched recursively), the first ``limit``
    of them; a warning for each input that gives none; :class:`UserError` if none is found."""
    from tome.cli.flags import positive
    from tome.tools.images import find_images

    paths, problems = find_images(inputs)
    for problem in problems:
        warn(f"skipped {problem}")
    if limit is not None:
        paths = paths[: positive("--limit", limit)]
    if not paths:
        raise UserError("no images found")
    return paths


def readable(paths: Sequence[Path], *, check_only: bool = False) -> list[Path]:
    """Keep the images that decode; warn about (and count) the others; fail if none is left.

    ``check_only``: stop at the first image that decodes, silently (a check before the model
    loads, for a command that opens the images later and warns about the others then)."""
    from tome.tools.images import open_image

    good, bad = [], []
    for path in paths:
        (bad if open_image(path) is None else good).append(path)
        if check_only and good:
            return good
    for path in bad:
        warn(f"skipped {path}: cannot read it as an image")
    if bad:
        warn(f"{len(bad)} unreadable image(s) skipped")
    if not good:
        raise UserError("no readable images")
    return good


# -- results -----------------------------------------------------------------------------------


def print_results(
    args,
    caption: str,
    table: str,
    data: str,
    spreads: Sequence[tuple[str, float | None]],
    reps_flag: str,
    plot: str | None = None,
) -> None:
    """The caption and the table, or with ``--json`` the JSON ``data`` alone: then a note on
    stderr says when the timings were noisy (``spreads``: each row's label and spread)."""
    if args.json:
        from tome.tools.measure.bench import noise_note

        print(data)
        note = noise_note(spreads, reps_flag=reps_flag)
        if note:
            info(args, f"tome: {note}")
        return
    print(caption)
    print(table)
    if plot:
        print(f"plot: {plot}")
