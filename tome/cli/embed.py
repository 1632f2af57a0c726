"""``tome embed``: a whole collection of images or texts into one parquet file, resumable; on Ray
Data with ``--ray`` (:mod:`tome.tools.embed.job`)."""

from __future__ import annotations

import sys

from tome.cli.common import info, warn
from tome.cli.flags import (
    EPILOG_MODELS,
    EPILOG_TEXT_MODELS,
    MERGE_MODES,
    METRICS,
    add_command,
    add_model_args,
    add_text_merge_args,
    checked_options,
    text_merge_kwargs,
)

_HELP = "embed a whole collection into a parquet file (resumable; on Ray with --ray)"
_DESCRIPTION = (
    "One row per image (or per line of text files): path (texts: id, FILE:LINE) and "
    "embedding (float32 list: the pooled / CLS feature of image models, the sentence-transformers "
    "embedding of text models), the model and settings in the file's metadata. Rows are written in "
    "chunks as they finish; rerun the same command after a crash or kill to finish the rest (nothing "
    "twice). Unreadable images are skipped, listed in OUT.skipped.tsv, and the exit status is 3. Bad "
    "input (a missing path, an empty folder, an --out that cannot be written or holds another model's "
    "rows): one line, exit status 2, nothing written."
)
_EXAMPLES = """\
  tome embed photos/ --out photos.parquet
  tome embed photos/ more.jpg --out photos.parquet --r 16:-0.75 --batch 64
  tome embed lines.txt --out lines.parquet --ratio 0.1          # text: all-MiniLM-L6-v2
  tome embed photos/ --out photos.parquet --ray                 # Ray on this machine
  tome embed /shared/photos --out /shared/photos.parquet --ray-address auto   # a running cluster
  tome embed /shared/photos --out s3://bucket/photos.parquet --ray-address auto  # workers write to S3
"""


def add_parser(subparsers) -> None:
    em = add_command(subparsers, "embed", _HELP, _DESCRIPTION, _EXAMPLES, EPILOG_MODELS + EPILOG_TEXT_MODELS)
    em.add_argument(
        "inputs", nargs="+", metavar="PATH", help="images, folders (searched recursively) or text files"
    )
    em.add_argument(
        "--out",
        required=True,
        metavar="FILE.parquet",
        help="the parquet file to write or finish: a path, or a pyarrow.fs URI (file://, s3://, gs://); with "
        "--ray the workers write its parts, so every node must see it",
    )
    schedule = em.add_mutually_exclusive_group()
    schedule.add_argument(
        "--r", metavar="R", help="tokens merged per block, one schedule: 16, 16:-0.75 (a ramp) or a per-layer "
        "[8,8,4] (default for images: 16; 0: unmerged)",
    )  # fmt: skip
    schedule.add_argument(
        "--ratio", metavar="P", help="instead of --r: every block merges away this fraction of each item's "
        "mergeable tokens (default for texts: 0.1)",
    )  # fmt: skip
    em.add_argument("--batch", type=int, default=32, help="items per forward pass (default: 32)")
    em.add_argument(
        "--chunk",
        type=int,
        default=512,
        metavar="N",
        help="rows per part file: what a crash may redo (default: 512)",
    )
    em.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="image decoding threads beside the model (default: min(4, CPU count)); with --ray, in each "
        "actor (default: min(4, the node's CPU count))",
    )
    em.add_argument("--json", action="store_true", help="print the summary as JSON")
    group = em.add_argument_group("texts")
    group.add_argument(
        "--texts", action="store_true", help="the inputs are text files, one text a line (default: when "
        "--model is text:... or every input is a .txt file)",
    )  # fmt: skip
    group.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="cut texts to N tokens (default: the model's max_seq_length)",
    )
    add_text_merge_args(group)
    group = em.add_argument_group("ray (pip install 'tome-merging[ray]')")
    group.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray (the workers write the parts): a local Ray for this job unless --ray-address",
    )
    group.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="a running Ray cluster: auto, or ray://HOST:10001 (implies --ray)",
    )
    group.add_argument(
        "--ray-actors",
        type=int,
        metavar="N",
        help="model copies (Ray actors, 1 CPU each, --threads torch threads; default: one per node)",
    )
    group = em.add_argument_group("merging (tome.patch options; default: the model family's)")
    group.add_argument("--mode", choices=MERGE_MODES, help="how tokens merge")
    group.add_argument("--metric", choices=METRICS, help="matching similarity")
    group.add_argument(
        "--keep-outliers", type=int, metavar="K", help="keep the K largest-norm tokens unmerged"
    )
    add_model_args(em, text=True)
    em.set_defaults(func=run)


def _options(args) -> dict:
    """The tome.patch options given (only those: text encoders keep their own default metric)."""
    given = {"mode": args.mode, "metric": args.metric, "keep_outliers": args.keep_outliers}
    options = {k: v for k, v in given.items() if v is not None}
    checked_options(options)
    return {**options, **text_merge_kwargs(args)}


def run(args) -> int:
    import json

    from tome.tools.embed.job import EXIT_SKIPPED, embed

    try:
        result = embed(
            args.inputs,
            args.out,
            model=args.model,
            r=args.r,
            ratio=args.ratio,
            texts=True if args.texts else None,
            batch=args.batch,
            chunk=args.chunk,
            workers=args.workers,
            threads=args.threads,
            weights=args.weights,
            random_init=args.random_init,
            img_size=args.img_size,
            max_tokens=args.max_tokens,
            ray=args.ray,
            ray_address=args.ray_address,
            ray_actors=args.ray_actors,
            progress=not args.quiet,
            log=lambda line: info(args, line),
            **_options(args),
        )
    except KeyboardInterrupt:
        print(
            f"tome: interrupted; the rows written so far are kept: rerun the same command to finish {args.out}",
            file=sys.stderr,
        )
        return 130
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.summary())
    if result.skipped:
        for key, reason in result.skipped[:5]:
            warn(f"skipped {key}: {reason}")
        more = f" ({len(result.skipped) - 5} more)" if len(result.skipped) > 5 else ""
        warn(f"{len(result.skipped)} item(s) skipped{more}, listed in {result.skipped_file}")
        return EXIT_SKIPPED
    return 0
