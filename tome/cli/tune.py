"""``tome tune``: the per-layer schedule that reaches a target speedup with the best fidelity."""

from __future__ import annotations

from tome.cli.common import check_vision_model, images, load, readable
from tome.cli.flags import EPILOG_MODELS, add_command, add_merge_args, add_model_args, merge_kwargs, positive
from tome.tools.errors import UserError

_HELP = "the per-layer schedule for a target speedup with the best fidelity"
_DESCRIPTION = (
    "Search a per-layer r schedule that reaches the target speedup (FLOP-ideal, or measured "
    "on this machine) with the best fidelity to the unmerged model on calibration images: ramps "
    "(r, inflection) first, then moving merges between blocks. Prints the schedule for --r."
)
_EXAMPLES = """\
  tome tune --images photos/ --target 2.0
  tome tune --images photos/ --target 1.5 --budget flops --limit 16 --json
"""


def add_parser(subparsers) -> None:
    tu = add_command(subparsers, "tune", _HELP, _DESCRIPTION, _EXAMPLES, EPILOG_MODELS)
    tu.add_argument(
        "--images", nargs="+", required=True, metavar="DIR", help="calibration image folder(s) or files"
    )
    tu.add_argument("--target", type=float, default=2.0, help="speedup to reach (default: 2.0)")
    tu.add_argument(
        "--budget",
        choices=("measured", "flops"),
        default="measured",
        help="measured: time it on this machine (default); flops: FLOP-ideal speedup only",
    )
    tu.add_argument(
        "--limit", type=int, default=32, metavar="N", help="calibration images used (default: 32)"
    )
    tu.add_argument(
        "--max-evals",
        type=int,
        default=24,
        metavar="N",
        help="passes over the images per round (default: 24)",
    )
    tu.add_argument(
        "--patch-weight",
        type=float,
        default=1.0,
        metavar="W",
        help="weight of the patch-token cosine next to the CLS cosine (default: 1.0)",
    )
    tu.add_argument(
        "--holdout",
        type=float,
        default=0.25,
        metavar="F",
        help="fraction of the images kept out of the search to check it (default: 0.25; 0: none)",
    )
    tu.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    tu.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_merge_args(tu)
    add_model_args(tu)
    tu.set_defaults(func=run)


def run(args) -> int:
    import json

    from tome.tools.images import open_image
    from tome.tools.tune.report import report
    from tome.tools.tune.search import TuneError, tune

    positive("--limit", args.limit)
    positive("--max-evals", args.max_evals)
    positive("--batch", args.batch)
    if not args.target > 1:
        raise UserError(f"--target must be a speedup > 1 (e.g. 2.0), got {args.target:g}")
    if not args.patch_weight >= 0:
        raise UserError(f"--patch-weight must be >= 0, got {args.patch_weight:g}")
    if not 0 <= args.holdout < 1:
        raise UserError(f"--holdout must be a fraction in [0, 1), got {args.holdout:g}")
    check_vision_model(args)
    paths = readable(images(args.images))[: args.limit]
    model = load(args)
    pictures = [open_image(path) for path in paths]
    try:
        result = tune(
            model,
            pictures,
            args.target,
            budget=args.budget,
            patch_weight=args.patch_weight,
            max_evals=args.max_evals,
            batch=args.batch,
            holdout=args.holdout,
            patch_kwargs=merge_kwargs(args),
            progress=not args.quiet,
        )
    except TuneError as error:
        raise UserError(str(error)) from None
    if args.json:
        print(json.dumps({"model": model.name, "img_size": model.img_size, **result.to_dict()}, indent=2))
        return 0
    print(
        f"{model.name}, {model.img_size}px, {result.images} calibration + {result.heldout_images} held-out "
        f"images, target {result.target_speedup:g}x ({result.budget})"
    )
    for line in report(result):
        print(line)
    print(
        f"{result.evaluations} schedules scored on every image, {result.screened} dropped after a few "
        f"images, in {result.seconds:.0f}s; use it with: --r '{result.r_text}'"
    )
    return 0
