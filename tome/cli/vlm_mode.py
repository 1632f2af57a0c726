"""Vision-language models in ``tome eval`` (``--prompts FILE``): their flags, their checks and
the run. Light at module level, as :mod:`tome.cli.flags`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tome.cli.common import images, info, readable
from tome.cli.flags import flag, given_flags, positive
from tome.tools.errors import UserError

DEFAULT_VISUAL_RATIO = "0.5,0.75"
DEFAULT_MAX_NEW_TOKENS = 16

# Flags of the other modes, refused with --prompts (the VLM run would ignore them).
_NOT_FOR_VLMS = (
    "r", "ratio", "texts", "sts", "max_tokens", "weights", "random_init", "img_size", "unmerge_detail",
    "metric", "min_tokens", "hidden_weight", "positions", "window",
)  # fmt: skip


def add_vlm_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "vision-language models (--prompts FILE with --images DIR and --model hf:FOLDER)"
    )
    group.add_argument(
        "--prompts",
        metavar="FILE",
        help="UTF-8 text file, one prompt per line: every image is asked every prompt, and the "
        "merged model's answers are compared with the unmerged model's",
    )
    group.add_argument(
        "--visual-tokens",
        metavar="N",
        help="each image reaches the language model as at most N tokens: 64, or a list 64,144",
    )
    group.add_argument(
        "--visual-ratio",
        metavar="P",
        help=f"or: merge away this fraction of each image's tokens: 0.75, or a list (default: "
        f"{DEFAULT_VISUAL_RATIO})",
    )
    group.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help=f"length of the greedy answers compared (default: {DEFAULT_MAX_NEW_TOKENS})",
    )


def vlm_run(args) -> bool:
    """Whether ``tome eval`` runs a vision-language model (``--prompts`` given); its flags
    checked before anything loads."""
    vlm_flags = given_flags(args, ("visual_tokens", "visual_ratio", "max_new_tokens"))
    if getattr(args, "prompts", None) is None:
        if vlm_flags:
            raise UserError(f"{flag(vlm_flags[0])}: for vision-language models only (give --prompts FILE)")
        return False
    other = given_flags(args, _NOT_FOR_VLMS)
    if other:
        raise UserError(
            f"{flag(other[0])}: not for vision-language models (--prompts); they merge by "
            "--visual-tokens or --visual-ratio"
        )
    if not args.images:
        raise UserError("--prompts: give --images DIR too (every image is asked every prompt)")
    if args.model is None or not args.model.startswith("hf:"):
        raise UserError(
            f"--prompts: give the vision-language model as --model hf:FOLDER (or hf:HUB_ID), got "
            f"{args.model or 'none'}"
        )
    if args.visual_tokens is not None and args.visual_ratio is not None:
        raise UserError("--visual-tokens and --visual-ratio: give one of them")
    if args.max_new_tokens is not None:
        positive("--max-new-tokens", args.max_new_tokens)
    vlm_settings(args)
    read_prompts(args.prompts)
    return True


def vlm_settings(args) -> list[dict]:
    """``--visual-tokens`` or ``--visual-ratio`` as ``tome.patch`` keywords, one dict a row."""
    if args.visual_tokens is not None:
        values = _numbers("--visual-tokens", args.visual_tokens, int)
        for value in values:
            positive("--visual-tokens", value)
        return [{"visual_tokens": value} for value in values]
    values = _numbers("--visual-ratio", args.visual_ratio or DEFAULT_VISUAL_RATIO, float)
    for value in values:
        if not 0 <= value < 1:  # also refuses nan
            raise UserError(f"--visual-ratio: expected fractions in [0, 1), got {value}")
    return [{"visual_ratio": value} for value in values]


def _numbers(name: str, text: str, kind: type) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        what = "whole numbers" if kind is int else "numbers"
        raise UserError(f"{name}: expected {what} separated by commas, got {text!r}") from None
    if not values:
        raise UserError(f"{name}: expected at least one value, got {text!r}")
    return values


def read_prompts(path: str) -> list[str]:
    """The prompts of ``path``: one a line, empty lines skipped."""
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--prompts {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--prompts {path}: cannot read it as UTF-8 text ({error})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in it (one a line)")
    return prompts


def evaluate(args):
    """The rows, caption, table and JSON of ``tome eval --prompts``."""
    from functools import partial

    from tome.cli.common import set_threads
    from tome.tools.images import open_image
    from tome.tools.measure.vlm_eval import evaluate_vlm, format_table, to_json
    from tome.tools.models.vlm_loading import load_vlm, vlm_inputs

    settings = vlm_settings(args)
    prompts = read_prompts(args.prompts)
    paths = readable(images(args.images, args.limit))
    set_threads(args)
    loaded = load_vlm(args.model, log=lambda line: info(args, line))
    info(args, f"model: {loaded.name} ({type(loaded.model).__name__})")

    def make(path: Path, prompt: str) -> dict:
        image = open_image(path)
        if image is None:  # became unreadable since it was checked
            raise UserError(f"cannot read {path}")
        return vlm_inputs(loaded.processor, image, prompt)

    pairs = [partial(make, path, prompt) for path in paths for prompt in prompts]
    new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    rows = evaluate_vlm(
        loaded.model,
        pairs,
        settings,
        image_token_id=loaded.model.config.image_token_id,
        max_new_tokens=new_tokens,
        speed_reps=args.speed_reps,
        progress=not args.quiet,
    )
    caption = (
        f"{loaded.name}, {len(paths)} images x {len(prompts)} prompts, batch 1: agreement with the unmerged "
        f"model (first answer token; greedy answers of {new_tokens} tokens)"
    )
    if args.speed_reps:
        caption += (
            f"; time to first token: generate(max_new_tokens=1) on the first pairs, median of "
            f"--speed-reps {args.speed_reps}"
        )
    meta = {"model": loaded.name, "images": len(paths), "prompts": len(prompts), "max_new_tokens": new_tokens}
    return rows, caption, format_table(rows), to_json(rows, **meta)
