"""The ``tome`` command: ``tome demo | viz | bench | eval | tune | embed``.

See ``tome --help`` and ``tome COMMAND --help``. User errors (missing images, unknown model,
weights that do not fit, bad ``--r``, an output folder that cannot be written) print one line to
stderr and exit with status 2.

One module per command (:mod:`~tome.cli.demo`, :mod:`~tome.cli.viz`, :mod:`~tome.cli.bench`,
:mod:`~tome.cli.eval`, :mod:`~tome.cli.tune`, :mod:`~tome.cli.embed`), each with
``add_parser(subparsers)`` and ``run(args) -> int``; the flags they share in :mod:`~tome.cli.flags`,
what they share when they run in :mod:`~tome.cli.common`. ``tome bench`` and ``tome eval`` also
take text encoders: ``--model text:`` (or ``hf:`` of a BERT-family or ModernBERT encoder) with
``--texts FILE`` (:mod:`~tome.cli.text_mode`, :mod:`tome.tools.models.text_loading`,
:mod:`tome.tools.measure.text_bench`, :mod:`tome.tools.measure.text_eval`).

Parsing needs neither torch nor the tools: every module of ``tome.cli`` imports them inside
``run``, so ``tome --help`` and argument errors come before any of that work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tome.cli import bench, demo, embed, tune, viz
from tome.cli import eval as eval_
from tome.cli.flags import EPILOG_ALL_MODELS, Formatter
from tome.cli.flags import merge_kwargs as _merge_kwargs  # noqa: F401 (tests import it from here)
from tome.tools.errors import UserError

__all__ = ["build_parser", "console", "main"]

COMMANDS = (demo, viz, bench, eval_, tune, embed)


def build_parser() -> argparse.ArgumentParser:
    from tome import __version__

    parser = argparse.ArgumentParser(
        prog="tome",
        formatter_class=Formatter,
        description="Token merging (ToMe) for the ViTs you already use: see what it merges, "
        "measure what it costs and gains, on your model and your images.",
        epilog="examples:\n"
        "  tome demo                                   # bundled photos, default model, offline\n"
        "  tome viz photos/ --r 16 --out pictures/\n"
        "  tome bench --r 0,8,13,16 --batch 32 --plot speed.png\n"
        "  tome eval --images val/ --r 8,16:-1.0 --json > fidelity.json\n"
        "  tome tune --images photos/ --target 2.0\n"
        "  tome embed photos/ --out photos.parquet --r 16:-0.75   # resumable; --ray: on Ray, the workers write\n\n"
        + EPILOG_ALL_MODELS,
    )
    parser.add_argument("--version", action="version", version=f"tome {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"tome: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tome: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def console() -> None:
    """The ``tome`` command: :func:`main`, then exit without the interpreter's last garbage
    collections. A run leaves millions of objects (torch, transformers, the model) that Python's
    finalization traverses again and again; frozen (``gc.freeze``), they are skipped (``python
    benchmarks/exit_time.py``: see its docstring for the figures). Files are closed and atexit
    handlers (Ray's, logging's) still run. Not in :func:`main`, which tests and scripts call in
    a process that goes on (frozen objects are never collected)."""
    import gc

    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
