"""Text encoders in ``tome bench`` and ``tome eval`` (``--texts FILE``): their flags, the choice
between the text and the vision run, and what both text runs share (the settings, the options,
the texts, the model).

Light at module level, as :mod:`tome.cli.flags`.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from pathlib import Path

from tome.cli.common import info, set_threads, warn, warn_notes
from tome.cli.flags import (
    DEFAULT_MODEL,
    DEFAULT_TEXT_MODEL,
    POSITION_RULES,
    WINDOW_RULES,
    add_merge_args,
    add_model_args,
    add_text_merge_args,
    flag,
    given_flags,
    merge_kwargs,
    options_note,
    parse_r,
    positive,
    text_merge_kwargs,
)
from tome.tools.errors import UserError

TEXT_DEFAULT_RATIO = "0.1,0.2"

# Flags (argparse names) that only text runs take.
TEXT_ONLY_FLAGS = (
    "max_tokens", "sts", "sts_limit", "keep_headings", "positions", "window", "min_tokens", "hidden_weight",
)  # fmt: skip


def add_last_args(parser: argparse.ArgumentParser, *, sts: bool) -> None:
    """The flags bench and eval end with: ``--json``, the merge options, the text models' flags
    (``sts``: and ``--sts``) and the model's."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    add_merge_args(parser)
    _add_text_args(parser, sts=sts)
    add_model_args(parser, text=True)


def _add_text_args(parser: argparse.ArgumentParser, *, sts: bool) -> None:
    group = parser.add_argument_group("text models (--texts FILE; --model text: by default then)")
    group.add_argument(
        "--texts",
        metavar="FILE",
        help="UTF-8 text file, one text per line; empty lines and WikiText headings (' = Title = ') are "
        "skipped",
    )
    group.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="cut every text to N tokens of the model's tokenizer, [CLS] and [SEP] included "
        "(default: the model's max_seq_length)",
    )
    group.add_argument("--keep-headings", action="store_true", help="keep WikiText heading lines as texts")
    add_text_merge_args(group)
    group.add_argument(
        "--positions",
        choices=POSITION_RULES,
        help="ModernBERT: a merged token rotates at its first original's position, or their mean "
        f"(default: {POSITION_RULES[0]})",
    )
    group.add_argument(
        "--window",
        choices=WINDOW_RULES,
        help="ModernBERT's local layers: a key is in a query's window if any of their original tokens "
        f"are (span), or by the merged positions (default: {WINDOW_RULES[0]})",
    )
    if sts:
        group.add_argument(
            "--sts",
            metavar="FILE.tsv",
            help="sentence pairs scored by people, score<TAB>sentence 1<TAB>sentence 2 per line: adds the "
            "Spearman correlation of the embeddings' cosine with the scores, unmerged and merged",
        )
        group.add_argument(
            "--sts-limit", type=int, metavar="N", help="only N pairs of --sts, spread evenly over the file"
        )


def text_run(args) -> bool:
    """Whether the command runs a text model on ``--texts``; refuses flags of the other kind."""
    from tome.tools.models.text_loading import check_text_spec, is_text_spec

    texts = getattr(args, "texts", None)
    if args.model is None:
        args.model = DEFAULT_TEXT_MODEL if texts is not None else DEFAULT_MODEL
    if texts is None:
        if is_text_spec(args.model):
            raise UserError(f"--model {args.model}: a text model needs --texts FILE (one text per line)")
        extra = given_flags(args, TEXT_ONLY_FLAGS)
        if extra:
            raise UserError(f"{flag(extra[0])}: for text models only (give --texts FILE)")
        return False
    check_text_spec(args.model)
    vision_only = given_flags(args, ("weights", "random_init", "img_size"))
    if vision_only:
        raise UserError(f"{flag(vision_only[0])}: for vision models; {args.model} is a text model")
    if getattr(args, "images", None):
        raise UserError("--images and --texts: give one of them")
    if getattr(args, "sts_limit", None) is not None:
        positive("--sts-limit", args.sts_limit)
        if args.sts is None:
            raise UserError("--sts-limit: give --sts FILE.tsv too")
    if args.max_tokens is not None:
        positive("--max-tokens", args.max_tokens)
    text_merge_kwargs(args)  # their checks, before the model loads
    return True


def text_settings(args) -> list:
    """``--ratio`` and ``--r`` rows, both allowed (default: ``--ratio 0.1,0.2``)."""
    from tome.tools.schedule_text import parse_ratio

    if args.r is None and args.ratio is None:
        args.ratio = TEXT_DEFAULT_RATIO
    settings = parse_ratio(args.ratio) if args.ratio is not None else []
    settings += parse_r(args.r) if args.r is not None else []
    return settings


def _rules(args) -> dict:
    """ModernBERT's rules given (model.tome.positions / .window: set on its handle, not tome.patch
    keywords)."""
    from tome.tools.models.text import HANDLE_RULES

    return {name: getattr(args, name) for name in HANDLE_RULES if getattr(args, name, None) is not None}


def text_options(args) -> dict:
    """The tome.patch options (``--min-tokens`` / ``--hidden-weight`` too), and ModernBERT's
    ``--positions`` / ``--window`` when given (:meth:`~tome.tools.models.text.TextModel.set_setting`
    sets those on its handle)."""
    return {**merge_kwargs(args), **text_merge_kwargs(args), **_rules(args)}


def text_options_note(args) -> str:
    """:func:`~tome.cli.flags.options_note` plus the text encoders' options and the ModernBERT
    rules given."""
    rules = [f"{name}={value}" for name, value in {**text_merge_kwargs(args), **_rules(args)}.items()]
    note = options_note(args)
    if not rules:
        return note
    return (f"{note}, " if note else "; ") + ", ".join(rules)


def read_texts(args) -> list[str]:
    from tome.tools.models.text_loading import read_texts as read

    limit = None if args.limit is None else positive("--limit", args.limit)
    return read(args.texts, keep_headings=args.keep_headings, limit=limit)


def prepare(args):
    """Read ``--texts``, load the model, tokenize the texts in ``--batch`` batches: the model, the
    texts and the tome.patch options to run it with."""
    lines = read_texts(args)
    model = load_text(args)
    return model, model.prepare(lines, args.batch), text_options(args)


def load_text(args):
    from tome.tools.models.text_loading import load_text_model

    set_threads(args)
    model = load_text_model(args.model, log=lambda line: info(args, line))
    warn_notes(model)
    if args.max_tokens is not None:
        if args.max_tokens > model.limit:
            raise UserError(
                f"--max-tokens {args.max_tokens}: {model.name} takes at most {model.limit} tokens"
            )
        model.max_tokens = args.max_tokens
    info(args, f"model: {model.describe()}")
    return model


def texts_note(texts, path: str) -> str:
    mean = sum(texts.lengths) / texts.count
    return (
        f"{texts.count} texts of {Path(path).name} (cut to {texts.max_tokens} tokens; mean {mean:.1f}, "
        f"longest {max(texts.lengths)})"
    )


@contextlib.contextmanager
def warnings_as_notes():
    """tome's warnings (e.g. a schedule capped on short texts) as one ``tome: warning:`` line
    each, once, without Python's source-line echo."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            seen = set()
            for item in caught:
                message = str(item.message).removeprefix("tome: ")
                if message not in seen:
                    seen.add(message)
                    warn(message)
