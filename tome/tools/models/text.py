"""One wrapper over text encoders for the tools: a sentence-transformers model, or a Hugging Face
BERT-family or ModernBERT encoder (mean pooling over its real tokens), with what ``tome bench``
and ``tome eval`` need of it: tokenizing texts once into length-sorted batches, embedding a
batch, the encoder's sizes, and patching (``tome.patch(model, r=...)`` or ``ratio=...``, plus
ModernBERT's ``positions`` / ``window`` rules, which live on its handle).

:func:`tome.tools.models.text_loading.load_text_model` builds one from a ``--model`` spec.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn as nn

import tome
from tome.runtime.registry import adapter_named
from tome.tools.errors import UserError
from tome.tools.schedule_text import Ratio, r_label

__all__ = ["HANDLE_RULES", "PreparedTexts", "TextModel"]

# Models whose position ids start after the padding id (positions 0..pad_id are never used).
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet")
# ModernBERT's settings of where a merged token is (for RoPE and the local window): options of
# its handle (tome.adapters.transformers_modernbert.ModernBertHandle), set after patching.
HANDLE_RULES = ("positions", "window")
_MODERNBERT = adapter_named("transformers_modernbert").classes


@dataclass
class PreparedTexts:
    """Texts tokenized once: ``batches`` of ``(indices into the texts, model inputs)``, longest
    texts first (as ``SentenceTransformer.encode`` sorts them, so little padding is run);
    ``lengths[i]``: tokens of text i after cutting ([CLS] and [SEP] included)."""

    batches: list[tuple[torch.Tensor, dict]]
    lengths: list[int]
    max_tokens: int

    @property
    def count(self) -> int:
        return len(self.lengths)


@dataclass
class TextModel:
    """A text encoder the tools run. ``module`` is what :func:`tome.patch` patches (the
    ``SentenceTransformer``, or the transformers model); ``encoder`` is the transformers model
    inside (its config gives the sizes). ``kind``: ``"sentence-transformers"`` (the model's own
    pooling and normalisation) or ``"transformers"`` (mean pooling over the real tokens)."""

    module: nn.Module
    encoder: nn.Module
    name: str
    kind: str
    tokenizer: object = None  # transformers models; sentence-transformers tokenize themselves
    max_tokens: int = 512  # the default cut (a sentence-transformers model's max_seq_length)
    notes: list[str] = field(default_factory=list)

    # -- sizes -------------------------------------------------------------------------------

    @property
    def config(self):
        return self.encoder.config

    @property
    def num_layers(self) -> int:
        config = self.config
        return int(getattr(config, "num_hidden_layers", None) or config.n_layers)

    @property
    def width(self) -> int:
        config = self.config
        return int(getattr(config, "hidden_size", None) or config.dim)

    @property
    def ffn_width(self) -> int:
        config = self.config
        return int(getattr(config, "intermediate_size", None) or config.hidden_dim)

    @property
    def gated_ffn(self) -> bool:
        """Whether the feed-forward is gated (ModernBERT's GLU: its input projection is two
        ``width x ffn_width`` matrices, so it costs 1.5x a BERT feed-forward of that width)."""
        return self.is_modernbert

    @property
    def is_modernbert(self) -> bool:
        """Whether the encoder is a ModernBERT (RoPE, local layers: it takes :data:`HANDLE_RULES`)."""
        return any(cls.__name__ in _MODERNBERT for cls in type(self.encoder).__mro__)

    @property
    def limit(self) -> int:
        """The longest input the model takes (its position embeddings)."""
        config = self.config
        positions = int(config.max_position_embeddings)
        if config.model_type in _OFFSET_POSITIONS:
            positions -= int(getattr(config, "pad_token_id", 1) or 0) + 1
        return positions

    @property
    def architecture(self) -> str:
        return type(self.encoder).__name__

    def describe(self) -> str:
        pooling = "its own pooling" if self.kind == "sentence-transformers" else "mean pooling"
        return (
            f"{self.name} ({self.kind}, {self.architecture}, {self.num_layers} layers, width {self.width}, "
            f"feed-forward {self.ffn_width}, {pooling}, texts cut to {self.max_tokens} tokens)"
        )

    # -- patching ----------------------------------------------------------------------------

    def set_setting(self, setting, **options) -> None:
        """Unpatched for ``None``; else patched with the setting (an ``r`` schedule, or a
        :class:`~tome.tools.schedule_text.Ratio`) and the :func:`tome.patch` options; the
        :data:`HANDLE_RULES` among ``options`` (ModernBERT only) are set on its handle."""
        given = {name: options.pop(name, None) for name in HANDLE_RULES}
        rules = {name: value for name, value in given.items() if value is not None}
        # Checked even for the unpatched row, so a wrong flag fails before anything is timed.
        if rules and not self.is_modernbert:
            raise UserError(
                f"--{next(iter(rules))}: a rule of ModernBERT models (where a merged token is for RoPE "
                f"and the local window); {self.name} is a {self.architecture}"
            )
        tome.unpatch(self.module)
        if setting is None:
            return
        try:
            if isinstance(setting, Ratio):
                tome.patch(self.module, ratio=setting.value, **options)
            else:
                tome.patch(self.module, setting, **options)
        except (ValueError, TypeError) as error:
            flag = f"--ratio {setting.value:g}" if isinstance(setting, Ratio) else f"--r {r_label(setting)}"
            raise UserError(f"{flag}: {error}") from error
        handle = self.handle()
        for name, value in rules.items():
            try:
                setattr(handle, name, value)
            except ValueError as error:  # the handle's own check: "positions: expected one of ..."
                tome.unpatch(self.module)
                raise UserError(f"--{error}") from None

    def handle(self) -> tome.ToMeHandle | None:
        """The handle of the patched encoder (None when unpatched)."""
        found = self.module.__dict__.get("tome")
        if isinstance(found, tome.PatchedModels):
            handles = list(found.handles.values())
            return handles[0] if len(handles) == 1 else None
        return found if isinstance(found, tome.ToMeHandle) else None

    def planned_tokens(self, length: int) -> list[int]:
        """Tokens of a text of ``length`` tokens entering layer 0, then after each layer, under
        the current setting (a row's merges depend on its own length only)."""
        handle = self.handle()
        if handle is None:
            return [length] * (self.num_layers + 1)
        return handle.planned_tokens(length)

    # -- running -----------------------------------------------------------------------------

    def prepare(self, texts: Sequence[str], batch: int, max_tokens: int | None = None) -> PreparedTexts:
        """Tokenize ``texts`` once, each cut to ``max_tokens`` tokens (default: the model's
        own cut), into batches of ``batch``, longest first."""
        cut = self.max_tokens if max_tokens is None else int(max_tokens)
        if cut > self.limit:
            raise UserError(f"--max-tokens {cut}: {self.name} takes at most {self.limit} tokens")
        if cut < 2:
            raise UserError(f"--max-tokens must be >= 2 (room for [CLS] and [SEP]), got {cut}")
        texts = list(texts)
        if not texts:
            return PreparedTexts([], [], cut)
        features = self._tokenize(texts, cut)
        mask = features["attention_mask"]
        lengths = mask.sum(1).tolist()
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        batches = []
        for start in range(0, len(order), batch):
            index = torch.tensor(order[start : start + batch])
            width = max(lengths[i] for i in index.tolist())
            batches.append((index, _rows(features, index, width, mask.shape)))
        return PreparedTexts(batches, [int(n) for n in lengths], cut)

    def _tokenize(self, texts: list[str], cut: int) -> dict:
        if self.kind == "sentence-transformers":
            self.module.max_seq_length = cut
            return dict(self.module.preprocess(texts))
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=cut, return_tensors="pt"))

    @torch.inference_mode()
    def embed(self, features: dict) -> torch.Tensor:
        """Embeddings ``(B, D)`` of one prepared batch."""
        if self.kind == "sentence-transformers":
            return self.module(dict(features))["sentence_embedding"]  # it adds to the dict it gets
        inputs = {k: v for k, v in features.items() if isinstance(v, torch.Tensor) and k in self._inputs}
        tokens = self.encoder(**inputs).last_hidden_state
        mask = inputs["attention_mask"].to(tokens.dtype)[..., None]
        return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1)

    @cached_property
    def _inputs(self) -> frozenset[str]:
        """The inputs the encoder's forward names: a tokenizer may give more than the model
        uses (BERT's tokenizer beside a ModernBERT gives ``token_type_ids``, which ModernBERT's
        ``**kwargs`` would take and hand, unused, to every layer)."""
        return frozenset(inspect.signature(type(self.encoder).forward).parameters) - {"self"}

    def run(self, prepared: PreparedTexts) -> None:
        """Every batch through the model, results discarded (what ``tome bench`` times)."""
        for _, features in prepared.batches:
            self.embed(features)

    def encode(self, prepared: PreparedTexts, step: Callable[[], object] | None = None) -> torch.Tensor:
        """Float32 embeddings ``(n, D)`` of the prepared texts, in their original order;
        ``step()`` after every batch (a progress bar)."""
        parts = []
        for index, features in prepared.batches:
            parts.append((index, self.embed(features).float()))
            if step is not None:
                step()
        if not parts:
            return torch.empty(0, 0)
        out = torch.empty(prepared.count, parts[0][1].shape[-1])
        for index, values in parts:
            out[index] = values
        return out


def _rows(features: dict, index: torch.Tensor, width: int, shape: torch.Size) -> dict:
    """Rows ``index`` of tokenizer outputs, trimmed to ``width`` tokens (their own padding)."""
    out = {}
    for key, value in features.items():
        if isinstance(value, torch.Tensor) and value.shape[:2] == shape:
            out[key] = value[index, :width]
        elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == shape[0]:
            out[key] = value[index]
        else:
            out[key] = value
    return out
