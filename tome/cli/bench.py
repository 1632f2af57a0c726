"""``tome bench``: throughput against r (images/s of a vision model; texts/s of a text encoder
with ``--texts FILE``), measured and FLOP-ideal speedups."""

from __future__ import annotations

from tome.cli import text_mode
from tome.cli.common import load, plot_file, print_results
from tome.cli.flags import (
    EPILOG_MODELS,
    EPILOG_TEXT_MODELS,
    add_command,
    add_schedule_args,
    merge_kwargs,
    merge_report,
    options_note,
    positive,
    settings,
)
from tome.tools.errors import UserError

_HELP = "throughput vs r, against the FLOP-ideal speedup"
_DESCRIPTION = (
    "Images/s of the unpatched model and of each r (interleaved runs, median), tokens "
    "after each block, GFLOPs per image, measured and FLOP-ideal speedup, efficiency = speedup / ideal. "
    "With --texts FILE, a text encoder's texts/s over the file's texts (tokenized once, in "
    "length-sorted batches), its FLOPs counted per text from its own tokens per layer: "
    "8nd^2 (projections) + 4n^2d (attention) + 4md*d_ff (feed-forward, on the m tokens left after the "
    "layer's merge)."
)
_EXAMPLES = """\
  tome bench
  tome bench --r 0,8,13,16,16:-1.0 --batch 32 --reps 7 --plot speed.png
  tome bench --model timm:vit_small_patch16_224 --random-init --json
  tome bench --model text: --texts wiki.txt --max-tokens 128 --limit 256 --ratio 0.1,0.2
"""


def add_parser(subparsers) -> None:
    bench = add_command(
        subparsers, "bench", _HELP, _DESCRIPTION, _EXAMPLES, EPILOG_MODELS + EPILOG_TEXT_MODELS
    )
    add_schedule_args(bench, "0,8,13,16", " (text models: both at once; default --ratio 0.1,0.2)", text=True)
    bench.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    bench.add_argument("--reps", type=int, default=5, help="timed runs per setting (default: 5)")
    bench.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed runs per setting first (default: 1; texts: of the first batch)",
    )
    bench.add_argument("--limit", type=int, metavar="N", help="only the first N texts of --texts")
    bench.add_argument("--plot", metavar="FILE", help="also write a PNG plot")
    text_mode.add_last_args(bench, sts=False)
    bench.set_defaults(func=run)


def run(args) -> int:
    text = text_mode.text_run(args)
    if not text and args.limit is not None:
        raise UserError("--limit: for text models only (tome bench times random images)")
    rs = text_mode.text_settings(args) if text else settings(args)
    for name in ("--batch", "--reps"):
        positive(name, getattr(args, name[2:]))
    plot = plot_file(args.plot)
    rows, caption, table, data = (_measure_texts if text else _measure_images)(args, rs, plot)
    print_results(args, caption, table, data, [(row.r, row.spread) for row in rows], "--reps", args.plot)
    return 0


def _measure_images(args, rs, plot):
    return measure(load(args), rs, args, batch=args.batch, reps=args.reps, warmup=args.warmup, plot=plot)


def measure(model, rs, args, *, batch: int, reps: int, warmup: int, plot=None):
    """Time the vision ``model`` at each of ``rs``; draw the ``plot`` file (checked by the caller)
    if given. Returns the rows, the caption, the table and the JSON."""
    import torch

    from tome.tools.measure.bench import format_table, run_bench, to_json

    rows = run_bench(
        model,
        rs,
        batch=batch,
        reps=reps,
        warmup=warmup,
        progress=not args.quiet,
        patch_kwargs=merge_kwargs(args),
    )
    threads = torch.get_num_threads()
    meta = {
        "model": model.name,
        "img_size": model.img_size,
        "batch": batch,
        "reps": reps,
        **_machine(threads),
    }
    caption = (
        f"{model.name}, {model.img_size}px, batch {batch}, fp32, CPU {threads} threads, "
        f"median of {reps} interleaved runs{options_note(args)}"
    )
    _plot(rows, plot, caption)
    return rows, caption, format_table(rows), to_json(rows, **meta)


def _measure_texts(args, settings, plot):
    import torch

    from tome.tools.measure.text_bench import format_table, run_text_bench, to_json

    model, texts, options = text_mode.prepare(args)
    with text_mode.warnings_as_notes():
        rows = run_text_bench(
            model,
            settings,
            texts,
            reps=args.reps,
            warmup=args.warmup,
            progress=not args.quiet,
            patch_kwargs=options,
        )
    threads = torch.get_num_threads()
    caption = (
        f"{model.name}, {text_mode.texts_note(texts, args.texts)}, batch {args.batch}, fp32, "
        f"CPU {threads} threads, median of {args.reps} interleaved runs over all the texts"
        f"{text_mode.text_options_note(args)}"
    )
    _plot(rows, plot, caption)
    meta = {
        "model": model.name,
        "texts": texts.count,
        "max_tokens": texts.max_tokens,
        "batch": args.batch,
        "reps": args.reps,
        **_machine(threads),
        **merge_report(args, text=True),
        **options,
    }
    return rows, caption, format_table(rows, gated=model.gated_ffn), to_json(rows, **meta)


def _machine(threads: int) -> dict:
    return {"threads": threads, "dtype": "float32", "device": "cpu"}


def _plot(rows, plot, caption: str) -> None:
    if plot is not None:
        from tome.tools.measure.bench import plot as draw

        draw(rows, plot, title=caption)
