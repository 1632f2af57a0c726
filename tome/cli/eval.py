"""``tome eval``: fidelity to the unmerged model on your images (and accuracy on labelled folders),
or a text encoder's on ``--texts FILE`` (and STS pairs with ``--sts``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tome.cli import flags, text_mode, vlm_mode
from tome.cli.common import check_vision_model, images, info, load, print_results, readable
from tome.tools.errors import UserError

_HELP = "fidelity vs the unmerged model (and accuracy on labelled folders)"
_DESCRIPTION = (
    "On your images: CLS/pooled cosine and patch-feature cosine (after unmerge) against "
    "the unmerged model, top-1 agreement of classifiers, saliency-map correlation for models with the "
    "saliency head. A folder with one sub-folder per class adds accuracy: the classifier's top-1 when "
    "folder names are its classes (e.g. ImageNet WordNet ids), and a k-NN on the pooled features "
    "(half of each class as the train split). With --texts FILE, a text encoder: the embeddings' "
    "cosine to the unmerged model (mean, min), and with --sts FILE.tsv the Spearman correlation of "
    "the pairs' cosine with the human scores, unmerged and merged. With --prompts FILE, a "
    "vision-language model (--model hf:FOLDER): every image asked every prompt, the merged model's "
    "first answer token (top-1 agreement, KL) and greedy answers against the unmerged model's, the "
    "tokens the language model reads and the time to first token."
)
_EXAMPLES = """\
  tome eval --images photos/
  tome eval --images imagenet/val --model timm:vit_small_patch16_224 --r 8,13,16 --limit 2000
  tome eval --images photos/ --json > fidelity.json
  tome eval --model text: --texts wiki.txt --max-tokens 128 --ratio 0.1,0.2 --sts sts2015-test.tsv
  tome eval --model hf:./llava-1.5-7b-hf --images photos/ --prompts questions.txt --visual-tokens 64,144
"""


def add_parser(subparsers) -> None:
    ev = flags.add_command(
        subparsers, "eval", _HELP, _DESCRIPTION, _EXAMPLES, flags.EPILOG_MODELS + flags.EPILOG_TEXT_MODELS
    )
    ev.add_argument("--images", nargs="+", metavar="DIR", help="image folder(s) or files (or --texts FILE)")
    flags.add_schedule_args(ev, "8,13,16", " (text models: both at once; default --ratio 0.1,0.2)", text=True)
    ev.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    ev.add_argument("--limit", type=int, metavar="N", help="only the first N images (or texts)")
    ev.add_argument(
        "--speed-reps",
        type=int,
        default=3,
        metavar="N",
        help="also time each r as tome bench does (the backbone, output not unmerged), median of "
        "N runs (default: 3; 0: no timing)",
    )
    ev.add_argument("--knn-k", type=int, default=20, help="neighbours of the k-NN classifier (default: 20)")
    text_mode.add_last_args(ev, sts=True)
    vlm_mode.add_vlm_args(ev)
    ev.set_defaults(func=run)


def run(args) -> int:
    if vlm_mode.vlm_run(args):
        flags.not_negative("--speed-reps", args.speed_reps)
        rows, caption, table, data = vlm_mode.evaluate(args)
        print_results(
            args, caption, table, data, [(row.setting, row.speed_spread) for row in rows], "--speed-reps"
        )
        return 0
    text = text_mode.text_run(args)
    if not text and not args.images:
        raise UserError("give --images DIR (or --texts FILE for a text model)")
    rs = text_mode.text_settings(args) if text else flags.settings(args)
    flags.positive("--batch", args.batch)
    if not text:
        flags.positive("--knn-k", args.knn_k)
    flags.not_negative("--speed-reps", args.speed_reps)
    rows, caption, table, data = _evaluate_texts(args, rs) if text else _evaluate_images(args, rs)
    print_results(args, caption, table, data, [(row.r, row.speed_spread) for row in rows], "--speed-reps")
    return 0


def _evaluate_images(args, rs):
    check_vision_model(args)
    paths = readable(images(args.images, args.limit))
    root = Path(args.images[0]) if len(args.images) == 1 and Path(args.images[0]).is_dir() else None
    return fidelity(load(args), paths, root, rs, args, batch=args.batch)


def fidelity(model, paths: Sequence[Path], root: Path | None, rs, args, *, batch: int):
    """Compare the vision ``model`` at each of ``rs`` with the unmerged one on ``paths`` (a
    labelled folder ``root`` adds accuracy). Returns the rows, the caption, the table and the JSON."""
    from tome.tools.images import open_image
    from tome.tools.measure.eval import evaluate, format_table, labels_for, to_json

    labels = labels_for(paths, root, model) if root is not None else None
    if labels is not None:
        matched = sum(m is not None for m in labels.model_index)
        info(args, f"labelled folder: {len(labels.classes)} classes ({matched} match the model's classes)")

    def load_image(i: int):
        image = open_image(paths[i])
        if image is None:  # became unreadable since it was checked
            raise UserError(f"cannot read {paths[i]}")
        return image

    rows = evaluate(
        model,
        load_image,
        len(paths),
        rs,
        batch=batch,
        labels=labels,
        knn_k=args.knn_k,
        progress=not args.quiet,
        patch_kwargs=flags.merge_kwargs(args),
        speed_reps=args.speed_reps,
    )
    meta = {"model": model.name, "img_size": model.img_size, "images": len(paths), **flags.merge_report(args)}
    caption = (
        f"{model.name}, {model.img_size}px, {len(paths)} images, fidelity vs the unmerged model"
        f"{flags.options_note(args)}"
    )
    caption += _speed_note(args, f"{batch} --reps {args.speed_reps} (backbone, output merged)")
    return rows, caption, format_table(rows), to_json(rows, **meta)


def _evaluate_texts(args, settings):
    from tome.tools.measure.text_eval import StsInputs, evaluate_text, format_table, to_json
    from tome.tools.models.text_loading import read_sts

    pairs = read_sts(args.sts, args.sts_limit) if args.sts else None
    model, texts, options = text_mode.prepare(args)
    sts = None
    if pairs is not None:
        sts = StsInputs(
            pairs.scores, model.prepare(pairs.first, args.batch), model.prepare(pairs.second, args.batch)
        )
    with text_mode.warnings_as_notes():
        rows = evaluate_text(
            model,
            settings,
            texts,
            sts=sts,
            patch_kwargs=options,
            progress=not args.quiet,
            speed_reps=args.speed_reps,
        )
    meta = {"model": model.name, "texts": texts.count, "max_tokens": texts.max_tokens}
    meta.update(flags.merge_report(args, text=True), **options)
    caption = (
        f"{model.name}, {text_mode.texts_note(texts, args.texts)}: embedding cosine to the unmerged model"
    )
    if pairs is not None:
        meta.update(sts=str(args.sts), sts_pairs=len(pairs))
        caption += (
            f"; STS: {len(pairs)} pairs of {Path(args.sts).name}, Spearman correlation of the embeddings' "
            "cosine with the human scores"
        )
    caption += _speed_note(args, f"{args.batch} --reps {args.speed_reps}")
    return rows, caption + text_mode.text_options_note(args), format_table(rows), to_json(rows, **meta)


def _speed_note(args, bench_flags: str) -> str:
    """What the speedup column means, when it was timed."""
    if not args.speed_reps:
        return ""
    return (
        f"; speedup as tome bench --batch {bench_flags}; "
        "spread: (slowest - fastest) / median of its timed runs"
    )
