"""What the text encoders' adapters share (:mod:`tome.adapters.transformers_text`,
:mod:`tome.adapters.transformers_modernbert`): their handle (:class:`TextHandle`, with the
``min_tokens`` and ``hidden_weight`` options), their defaults, where a family keeps its parts
(:class:`TextFamily`), and the start of a layer call: the padding and packed-document masks of
a pass (``tome_sequence_ids``) and the checks of the model's attention mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tome.core import merge as M
from tome.runtime.handle import BlockCall, ToMeHandle
from tome.runtime.options import Option, at_least, number_in

__all__ = [
    "DEFAULT_HIDDEN_WEIGHT",
    "DEFAULT_MIN_TOKENS",
    "PACKED_KEYWORD",
    "TEXT_DEFAULTS",
    "TextFamily",
    "TextHandle",
    "begin_text_layer",
    "check_attention_mask",
    "check_implementation",
    "get_path",
    "refuse_outliers",
]

_BIAS_IMPLEMENTATIONS = ("eager", "sdpa")
# Text encoders' defaults of the shared options. unmerge_output: pooling reads every token with
# the attention mask, so the sequence output comes back at the original length unless the user
# asks otherwise. metric: on all-MiniLM-L6-v2 at ratio 0.1, per-head key similarity kept the
# embedding cosine at 0.986 against 0.970 for head-averaged keys (held-out paragraphs,
# benchmarks/text.py).
TEXT_DEFAULTS = {"unmerge_output": True, "metric": "head_keys"}
# The keyword of a model's forward that makes a pass packed (document ids per token).
PACKED_KEYWORD = "tome_sequence_ids"
# The text adapters' own options (TextHandle). Defaults: the best measured on the tuning halves
# of WikiText-2 / STS-2015 on all-MiniLM-L6-v2 (benchmarks/experiments); held-out figures in
# benchmarks/text.py and docs/text.md.
DEFAULT_MIN_TOKENS = 24
DEFAULT_HIDDEN_WEIGHT = 0.5


class TextHandle(ToMeHandle):
    """The handle of a patched text encoder: :class:`ToMeHandle` plus two settings (declared
    options: ``tome.patch`` keywords, settable here)."""

    unit_metric = True

    min_tokens = Option(
        DEFAULT_MIN_TOKENS,
        at_least(0),
        "a row (a text) is never merged below this many tokens: short texts stay whole, long ones "
        "merge by the schedule (depends on the row alone: batch invariance holds)",
        flag="--min-tokens",
    )
    hidden_weight = Option(
        DEFAULT_HIDDEN_WEIGHT,
        number_in(0, 1),
        "the share w of the hidden states in the matching similarity: (1 - w) cos(keys) + "
        "w cos(hidden states); 0: keys only, as ToMe",
        flag="--hidden-weight",
    )

    def _floor(self, removed: int, num_tokens: int) -> int:
        return max(0, min(removed, num_tokens - self._min_tokens))

    def _removed(self, index: int, num_tokens: int) -> int:
        return self._floor(super()._removed(index, num_tokens), num_tokens)

    def layer_r(self, index: int, num_tokens: int) -> int:
        if self._floor(num_tokens, num_tokens) < ToMeHandle._removed(self, index, num_tokens):
            return self._removed(index, num_tokens)  # the floor, not the cap: no cap warning
        return super().layer_r(index, num_tokens)

    def rows_removed(self, index: int, valid_tokens: torch.Tensor) -> torch.Tensor:
        wanted = super().rows_removed(index, valid_tokens)
        return torch.minimum(wanted, (valid_tokens - self._min_tokens).clamp_min(0))

    def matching_metric(self, keys: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
        """The merge metric of a block from its keys' features (:meth:`take_keys`) and the
        hidden states ``(B, N, C)`` it merges: both normalized and concatenated with weights
        ``sqrt(1 - w)`` and ``sqrt(w)``, so its cosine is the weighted sum of theirs. Unit-norm
        (:attr:`unit_metric`): one float32 buffer, which matching reads without another copy."""
        if keys is None:
            return None
        with self.merge_step_part(hidden):
            return self._unit_metric(keys, hidden)

    def _unit_metric(self, keys: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        w = self._hidden_weight
        if w == 0:
            return M.unit_features([keys], [1.0])
        if w == 1:
            return M.unit_features([hidden], [1.0])
        return M.unit_features([keys, hidden], [1 - w, w])


@dataclass(frozen=True)
class TextFamily:
    """Where a text encoder keeps its parts (dotted paths of attributes)."""

    layers: str  # dotted path from the base model to its ModuleList of layers
    layer_class: str
    key: str  # dotted path from a layer to its key projection (nn.Linear)
    attention: str  # dotted path from a layer to the module with the head size
    kind: str  # "bert": attention -> feed_forward_chunk; "distilbert": attention, norms, ffn
    output: str  # the module whose output is the sequence output


def get_path(module: nn.Module, path: str) -> nn.Module | None:
    """The submodule at the dotted ``path`` of ``module``, or ``None`` if some part is missing."""
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def check_implementation(layer: nn.Module, family: TextFamily) -> None:
    """A clear error unless the layer's attention takes an additive float mask."""
    config = getattr(get_path(layer, family.attention), "config", None)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in _BIAS_IMPLEMENTATIONS:
        raise ValueError(
            f"tome: merged tokens need an additive float attention mask, which attn_implementation="
            f"{implementation!r} does not take; use model.set_attn_implementation('sdpa') (or 'eager')"
        )


def begin_text_layer(
    layer: nn.Module,
    index: int,
    handle: ToMeHandle,
    family: TextFamily,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict,
) -> BlockCall:
    """The call of text layer ``index``: block 0 starts the pass with the key mask of the
    model's ``attention_mask`` (``(B, 1, N, N)``) and of the packed documents
    (``tome_sequence_ids``, popped from ``kwargs``), checking that the attention takes a float
    mask when it will need one; later layers continue the pass of their input."""
    sequence_ids = kwargs.pop(PACKED_KEYWORD, None)
    if index != 0:
        return handle.begin_layer(index, hidden_states)
    if handle.schedules_merges(index) or sequence_ids is not None:
        check_implementation(layer, family)
    key_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 4 or attention_mask.shape[-1] != hidden_states.shape[1]:
            raise ValueError(
                f"tome: a patched transformers layer expects a (B, 1, N, N) attention mask, got "
                f"{tuple(attention_mask.shape)} for {hidden_states.shape[1]} tokens"
            )
        key_mask = handle.key_mask_from(attention_mask)
    if sequence_ids is not None:
        B, N = hidden_states.shape[:2]
        if not isinstance(sequence_ids, torch.Tensor) or tuple(sequence_ids.shape) != (B, N):
            raise ValueError(
                f"{PACKED_KEYWORD}: expected a ({B}, {N}) integer tensor of document ids, got "
                f"{getattr(sequence_ids, 'shape', type(sequence_ids).__name__)}"
            )
        sequence_ids = sequence_ids.to(hidden_states.device).long()
        real = sequence_ids >= 0
        key_mask = real if key_mask is None else key_mask & real
    call = handle.begin_layer(index, hidden_states, key_mask=key_mask)
    call.pass_state.sequence_ids = sequence_ids
    return call


def check_attention_mask(handle: ToMeHandle, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Pre-hook of the base model: refuse an ``attention_mask`` other than 0/1 (or bool): a mask
    of 0.5 or 2 would be read as "attend" by some paths and not others."""
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    checkable = isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.dtype != torch.bool
    if checkable and not torch.compiler.is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            "attention_mask: expected 0/1 (or bool) values, 1 for real tokens and 0 for padding; got "
            f"values {sorted(set(mask.unique().tolist()))[:6]}"
        )
    return None


def refuse_outliers(settings: dict, why: str) -> None:
    """A clear error (saying ``why``) when the patch settings ask to keep outliers
    (``keep_outliers``), which text encoders do not do."""
    options = settings.get("options")
    if options is not None and options.keep_outliers:
        raise ValueError(f"keep_outliers: expected 0 for text encoders, got {options.keep_outliers}: {why}")
