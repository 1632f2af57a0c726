"""``ToMeHandle``: the per-model state of a patched model (``model.tome``).

Adapters (one per framework) re-compose each transformer block from the library's own
submodules and call the handle at three points of every block::

    state = handle.begin_layer(i, x)                  # history of the tokens entering block i
    bias = handle.attention_bias(state, x.dtype)      # log(size) mask, or None
    ... attention(x, mask=bias), residual ...         # per-head keys k: (B, N, heads, head_dim)
    metric = handle.similarity_features(k) if handle.wants_keys(i, N) else None
    x = handle.merge_layer(i, state, x, metric)       # between attention and MLP
    ... MLP, residual ...
    x = handle.end_layer(i, x)                        # after the last block: unmerge + detail

State lives per model and per forward pass: block 0 starts a fresh history, block i reads what
block i - 1 wrote. Because each block writes its own slot (never pops a shared list), recomputing
a block (gradient checkpointing) gives the same result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from tome import merge as M
from tome.merge import MergeHistory
from tome.schedule import Schedule, check_schedule, resolve_schedule

__all__ = ["LayerState", "MergeOptions", "ToMeHandle"]

METRICS = ("keys", "head_keys")
MERGE_MODES = ("mlerp", "mean")


@dataclass(frozen=True)
class MergeOptions:
    """How a patched model merges: the keyword options of :func:`tome.patch` that are fixed
    when patching (``r``, ``prop_attn`` and ``unmerge_output`` stay settable on the handle).

    The defaults are the best measured at equal *measured* speed on a real model
    (``benchmarks/fidelity.py``, README): ToMe with ``mode="mlerp"``.
    ``MergeOptions(mode="mean")`` is the original ToMe.

    Attributes:
        metric: what similarity decides the merges: ``"keys"`` (the cosine similarity of the
            keys averaged over heads, as in ToMe) or ``"head_keys"`` (the mean over heads of
            each head's key cosine similarity: better dense outputs at equal FLOPs, but a
            matching product ``heads`` times wider: on CPU the merge step of DINOv2-S goes
            from ~2.3% to ~4% of the forward at 224 px and from 2.5% to 5.3% at 518 px).
        mode: ``"mlerp"`` (the size-weighted mean, rescaled to the largest norm among the
            tokens it combines: ToFu, Kim et al., WACV 2024) or ``"mean"`` (ToMe).
        unmerge_detail: when the output is unmerged (``unmerge_output``), give every original
            token back its own deviation from what its group became at each merge (better
            dense outputs at equal FLOPs, mostly when few tokens are left; ~0.7% of a ViT-S
            forward on CPU in memory traffic).
        keep_outliers: in every merging block, the ``k`` unprotected tokens of largest norm are
            kept out of the merge, unless a block has to merge more tokens than the others can
            give (Darcet et al., "Vision Transformers Need Registers", 2024).

    >>> MergeOptions(mode="mean")  # the original ToMe
    MergeOptions(metric='keys', mode='mean', unmerge_detail=False, keep_outliers=0)
    >>> MergeOptions(metric="head_keys").similarity_features(torch.randn(2, 5, 6, 64)).shape
    torch.Size([2, 5, 384])
    """

    metric: str = "keys"
    mode: str = "mlerp"
    unmerge_detail: bool = False
    keep_outliers: int = 0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.mode not in MERGE_MODES:
            raise ValueError(f"mode: expected one of {', '.join(MERGE_MODES)}, got {self.mode!r}")
        if not isinstance(self.unmerge_detail, bool):
            raise TypeError(f"unmerge_detail: expected True or False, got {self.unmerge_detail!r}")
        if (
            isinstance(self.keep_outliers, bool)
            or not isinstance(self.keep_outliers, int)
            or self.keep_outliers < 0
        ):
            raise ValueError(f"keep_outliers: expected an int >= 0, got {self.keep_outliers!r}")

    def similarity_features(self, keys: torch.Tensor) -> torch.Tensor:
        """The matching metric from per-head keys ``(B, N, heads, head_dim)``: ``(B, N, D)``."""
        if self.metric == "keys":
            return keys.mean(dim=-2)
        # Every head normalized on its own, then concatenated: the cosine similarity of the
        # result is the mean of the per-head cosines, so no head dominates by its key norm.
        return F.normalize(keys.float(), dim=-1).flatten(-2)


def _check_flag(name: str, value: object) -> bool:
    # bool("no") is True: a string or a number would silently mean something else.
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


@dataclass(frozen=True)
class LayerState:
    """The tokens entering a block: their history, and whether anything was merged before
    (a Python bool, so the unmerged fast path needs no tensor check)."""

    history: MergeHistory
    merged: bool


class ToMeHandle:
    """Settings and per-pass results of a patched model, reachable as ``model.tome``.

    Attributes:
        r: the schedule (int, per-layer list or ``(r, inflection)``); settable.
        prop_attn: add ``log(size)`` to attention logits (proportional attention); settable.
        unmerge_output: return the model's token outputs at the original length; settable.
        options: the :class:`MergeOptions` the model was patched with (fixed; patch again to
            change them).
        protected: leading tokens never merged (class/distillation/register tokens).
        num_layers: number of patched blocks.
        tokens_per_layer: after a forward pass, the token count each block saw (input), plus
            the count left after the last block.
    """

    def __init__(
        self,
        num_layers: int,
        r: Schedule,
        *,
        protected: int,
        prop_attn: bool = True,
        unmerge_output: bool = False,
        options: MergeOptions | None = None,
        family: str = "",
    ) -> None:
        self.num_layers = num_layers
        self.protected = protected
        self.prop_attn = prop_attn
        self.unmerge_output = unmerge_output
        self.options = MergeOptions() if options is None else options
        self.family = family
        self.r = r
        # Per block, slots (never a shared list that is popped): a block recomputed by gradient
        # checkpointing sees exactly what it saw in its forward pass.
        self._histories: list[MergeHistory | None] = [None] * num_layers
        # unmerge_detail: per merging block, (the rows of its input tokens the merge changed,
        # their residuals, the plan's index map); None for blocks that merged nothing.
        self._deviations: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.tokens_per_layer: list[int] = []
        self._undo: list[Callable[[], None]] = []

    # -- settings ------------------------------------------------------------------------------

    @property
    def r(self) -> Schedule:
        return self._r

    @r.setter
    def r(self, value: Schedule) -> None:
        check_schedule(value)
        self._r_per_layer = resolve_schedule(value, self.num_layers)
        self._r = value

    @property
    def prop_attn(self) -> bool:
        return self._prop_attn

    @prop_attn.setter
    def prop_attn(self, value: bool) -> None:
        self._prop_attn = _check_flag("prop_attn", value)

    @property
    def unmerge_output(self) -> bool:
        return self._unmerge_output

    @unmerge_output.setter
    def unmerge_output(self, value: bool) -> None:
        self._unmerge_output = _check_flag("unmerge_output", value)

    @property
    def r_per_layer(self) -> list[int]:
        """The schedule resolved to one int per layer (before capping at what each layer can
        merge)."""
        return list(self._r_per_layer)

    def patch_options(self) -> dict:
        """The keyword options of :func:`tome.patch` this handle has now (for patching again)."""
        return {"prop_attn": self.prop_attn, "unmerge_output": self.unmerge_output, **asdict(self.options)}

    # -- the block protocol (used by adapters) -------------------------------------------------

    def begin_layer(self, index: int, x: torch.Tensor) -> LayerState:
        """History of the tokens ``x`` (B, N, C) entering block ``index``."""
        B, N = x.shape[:2]
        if index == 0:
            # Slots are overwritten in order, never cleared: a block recomputed by gradient
            # checkpointing still finds its predecessor's history (and block 0 recomputed
            # during backward keeps the later blocks' counts).
            self.tokens_per_layer[:1] = [N]
            return LayerState(M.start_history(B, N, x.device), merged=False)
        previous = self._histories[index - 1]
        if previous is None or tuple(previous.sizes.shape) != (B, N):
            raise RuntimeError(
                f"tome: block {index} received {N} tokens for batch {B}, which do not come from "
                f"block {index - 1} of this forward pass; patched blocks must run in order, "
                "starting with block 0"
            )
        merged = previous.num_original != previous.num_tokens
        return LayerState(previous, merged=merged)

    def attention_bias(self, state: LayerState, dtype: torch.dtype) -> torch.Tensor | None:
        """Proportional attention mask ``(B, 1, 1, N)`` = log(size), or ``None`` when it
        would be all zeros (nothing merged yet, or ``prop_attn`` off)."""
        if not (self.prop_attn and state.merged):
            return None
        return M.attention_bias(state.history.sizes, dtype)

    def layer_r(self, index: int, num_tokens: int) -> int:
        """Tokens block ``index`` removes: its schedule entry, capped at what it can merge."""
        return min(self._r_per_layer[index], M.max_r(num_tokens, self.protected))

    def wants_keys(self, index: int, num_tokens: int) -> bool:
        """Whether block ``index`` (with ``num_tokens`` tokens) needs the keys: it merges."""
        return self.layer_r(index, num_tokens) > 0

    def similarity_features(self, keys: torch.Tensor) -> torch.Tensor:
        """The matching metric from per-head keys ``(B, N, heads, head_dim)``."""
        return self.options.similarity_features(keys)

    def _tracks_detail(self) -> bool:
        return self.options.unmerge_detail and self.unmerge_output

    def merge_layer(
        self, index: int, state: LayerState, x: torch.Tensor, metric: torch.Tensor | None
    ) -> torch.Tensor:
        """Merge ``x`` (B, N, C) by the similarity of ``metric`` (B, N, D), from
        :meth:`similarity_features`; record the history. ``metric`` may be ``None`` where the
        block removes nothing (:meth:`wants_keys` is False)."""
        r = self.layer_r(index, x.shape[1])
        # Slot assignments, not truncation: a block recomputed by gradient checkpointing (during
        # backward, last block first) rewrites its own count and keeps the later ones.
        self._deviations[index] = None
        if r == 0:
            self._histories[index] = state.history
            self.tokens_per_layer[index + 1 : index + 2] = [x.shape[1]]
            return x
        if metric is None:
            raise RuntimeError(f"tome: block {index} merges {r} tokens but its adapter passed no keys")
        bias = None
        if self.options.keep_outliers:
            bias = M.outlier_bias(x, self.options.keep_outliers, self.protected)
        plan = M.bipartite_soft_matching(metric, r, state.history, self.protected, token_bias=bias)
        history = M.advance(state.history, plan)
        self._histories[index] = history
        self.tokens_per_layer[index + 1 : index + 2] = [history.num_tokens]
        merged = M.merge(plan, x, self.options.mode)
        if self._tracks_detail():
            self._deviations[index] = (*M.merge_residuals(plan, x, merged), plan.index)
        return merged

    def end_layer(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The output ``x`` of block ``index``; after the last block, with ``unmerge_output``
        and ``unmerge_detail``, the tokens at the original length, each with its detail."""
        if index != self.num_layers - 1 or not self._tracks_detail():
            return x
        history = self._histories[index]
        if history is None or history.num_tokens == history.num_original:
            return x
        return M.unmerge(history.source, x) + self._detail().to(x.dtype)

    def _detail(self, num_blocks: int | None = None) -> torch.Tensor:
        """Every original token's summed residuals ``(B, N0, C)`` over the first ``num_blocks``
        blocks (all by default): from the last block down, each block's sum is carried to its
        input tokens (one gather by the plan's index) and that block's own residuals are added
        to the rows its merge changed; block 0's input tokens are the originals."""
        total = None
        for entry in reversed(self._deviations[:num_blocks]):
            if entry is None:
                continue  # nothing merged: this block's input tokens are its output tokens
            rows, residuals, index = entry
            if total is None:
                total = residuals.new_zeros((index.shape[0], index.shape[1], *residuals.shape[2:]))
            else:
                total = M.unmerge(index, total)
            total = M.add_rows(total, rows, residuals)
        if total is None:
            raise RuntimeError("tome: no block of this forward pass recorded merge details")
        return total

    # -- results -------------------------------------------------------------------------------

    @property
    def history(self) -> MergeHistory | None:
        """History after the last block of the latest forward pass (None before any)."""
        return self._histories[-1] if self._histories else None

    @property
    def source(self) -> torch.Tensor | None:
        """``(B, N0)``: index of the output token that holds each input token."""
        return None if self.history is None else self.history.source

    @property
    def sizes(self) -> torch.Tensor | None:
        """``(B, N)``: how many input tokens each output token holds."""
        return None if self.history is None else self.history.sizes

    def unmerge(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bring the model's merged tokens ``(B, N, ...)`` back to ``(B, N0, ...)`` (every
        original token gets its group's value; no detail)."""
        history = self.history
        if history is None:
            raise RuntimeError("tome: run a forward pass of the patched model before unmerge()")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
            raise TypeError(f"tokens: expected a (B, N, ...) tensor, got {type(tokens).__name__}")
        if tuple(tokens.shape[:2]) == tuple(history.source.shape):
            return tokens  # already at the original length
        if tuple(tokens.shape[:2]) != tuple(history.sizes.shape):
            raise ValueError(
                f"tokens: expected (B, N, ...) with (B, N) = {tuple(history.sizes.shape)} (the output of "
                f"the latest forward pass), got {tuple(tokens.shape)}"
            )
        return M.unmerge(history.source, tokens)

    # -- undo ----------------------------------------------------------------------------------

    def on_unpatch(self, callback: Callable[[], None]) -> None:
        """Register a callback that undoes one change; run in reverse order by ``unpatch``."""
        self._undo.append(callback)

    def _restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    @contextlib.contextmanager
    def undone_on_error(self) -> Iterator[ToMeHandle]:
        """Adapters make their changes inside this block: if one fails, the ones already made
        are undone, so a failed patch never leaves a hook or a replaced forward behind."""
        try:
            yield self
        except BaseException:
            self._restore()
            raise

    def __repr__(self) -> str:
        return (
            f"ToMeHandle(family={self.family!r}, r={self.r!r}, layers={self.num_layers}, "
            f"protected={self.protected}, prop_attn={self.prop_attn}, unmerge_output={self.unmerge_output}, "
            f"options={self.options})"
        )
