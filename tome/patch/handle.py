"""``ToMeHandle``: the per-model state of a patched model (``model.tome``).

Adapters (one per framework) re-compose each transformer block from the library's own
submodules and call the handle at three points of every block::

    state = handle.begin_layer(i, x)                  # history of the tokens entering block i
    bias = handle.attention_bias(state, x.dtype)      # log(size) mask, or None
    ... attention(x, mask=bias), residual ...
    x = handle.merge_layer(i, state, x, keys)         # between attention and MLP
    ... MLP, residual ...

State lives per model and per forward pass: block 0 starts a fresh history, block i reads what
block i - 1 wrote. Because each block writes its own slot (never pops a shared list), recomputing
a block (gradient checkpointing) gives the same result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tome import merge as M
from tome.merge import MergeHistory
from tome.schedule import Schedule, check_schedule, resolve_schedule

__all__ = ["LayerState", "ToMeHandle", "check_options"]

METRICS = ("keys", "x")
MERGE_MODES = ("mean", "mlerp")


def check_options(
    *,
    metric: str = "keys",
    energy: bool | float = False,
    mode: str = "mean",
    size_penalty: float = 0.0,
    keep_outliers: int = 0,
) -> None:
    """Raise a clear error for a bad keyword option of :func:`tome.patch`."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    if mode not in MERGE_MODES:
        raise ValueError(f"mode: expected one of {', '.join(MERGE_MODES)}, got {mode!r}")
    if not isinstance(energy, bool) and (not isinstance(energy, int | float) or not energy >= 2):
        raise ValueError(f"energy: expected False, True or a merge-pool factor >= 2, got {energy!r}")
    if isinstance(size_penalty, bool) or not isinstance(size_penalty, int | float) or not size_penalty >= 0:
        raise ValueError(f"size_penalty: expected a number >= 0, got {size_penalty!r}")
    if isinstance(keep_outliers, bool) or not isinstance(keep_outliers, int) or keep_outliers < 0:
        raise ValueError(f"keep_outliers: expected an int >= 0, got {keep_outliers!r}")


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
        prop_attn: add ``log(size)`` to attention logits (proportional attention).
        unmerge_output: return the model's token outputs at the original length.
        metric: what similarity is measured on: ``"keys"`` (attention keys averaged over
            heads, ToMe) or ``"x"`` (the hidden states being merged).
        energy: keep isolated tokens out of the merge (PiToMe's energy score): ``False``, or
            ``True`` / a float ``pool >= 2``: only the ``pool * r`` tokens of highest energy
            may merge (``True`` is ``pool = 2``, as in PiToMe).
        unmerge_detail: after the last block, return the tokens at the original length, every
            original token with its own deviation from its group's mean at the time it was
            merged added back (memory O(B N0 C) per merging block).
        mode: how tokens are merged: ``"mean"`` (ToMe) or ``"mlerp"`` (ToFu).
        size_penalty: ``beta``: every edge's score loses ``beta * log(size)`` of its tokens, so
            large groups grow more slowly.
        keep_outliers: in every merging block, the ``k`` unprotected tokens of largest norm
            (DINOv2's high-norm "register-like" tokens) are kept out of the merge.
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
        metric: str = "keys",
        energy: bool | float = False,
        unmerge_detail: bool = False,
        mode: str = "mean",
        size_penalty: float = 0.0,
        keep_outliers: int = 0,
        family: str = "",
    ) -> None:
        check_options(
            metric=metric, energy=energy, mode=mode, size_penalty=size_penalty, keep_outliers=keep_outliers
        )
        self.num_layers = num_layers
        self.protected = protected
        self.prop_attn = bool(prop_attn)
        self.unmerge_output = bool(unmerge_output)
        self.metric = metric
        self.energy = energy
        self.unmerge_detail = bool(unmerge_detail)
        self.mode = mode
        self.size_penalty = float(size_penalty)
        self.keep_outliers = int(keep_outliers)
        # Per block: the summed deviations of every original token from its group after that
        # block (unmerge_detail). Slots, like the histories, so that a block recomputed by
        # gradient checkpointing sees exactly what it saw in its forward pass.
        self._details: list[torch.Tensor | None] = [None] * num_layers
        self.family = family
        self.r = r
        self._histories: list[MergeHistory | None] = [None] * num_layers
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
    def r_per_layer(self) -> list[int]:
        """The schedule resolved to one int per layer (before capping at what each layer can
        merge)."""
        return list(self._r_per_layer)

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

    def merge_layer(
        self, index: int, state: LayerState, x: torch.Tensor, keys: torch.Tensor | None
    ) -> torch.Tensor:
        """Merge ``x`` (B, N, C) by the similarity of ``keys`` (B, N, D); record the history.
        ``keys`` may be ``None`` where the block removes nothing (``layer_r`` is 0)."""
        r = self.layer_r(index, x.shape[1])
        detail = self._details[index - 1] if index > 0 and state.merged else None
        self._details[index] = detail
        # Slot assignments, not truncation: a block recomputed by gradient checkpointing (during
        # backward, last block first) rewrites its own count and keeps the later ones.
        if r == 0:
            self._histories[index] = state.history
            self.tokens_per_layer[index + 1 : index + 2] = [x.shape[1]]
            return x
        metric = x if self.metric == "x" or keys is None else keys
        bias = None
        if self.energy is not False:
            pool = 2.0 if self.energy is True else float(self.energy)
            energy = M.energy_score(metric, self.protected)
            bias = M.isolation_bias(energy, r, self.protected, pool)
        if self.size_penalty and state.merged:
            penalty = -self.size_penalty * state.history.sizes.log()
            bias = penalty if bias is None else bias + penalty
        if self.keep_outliers:
            outliers = M.outlier_bias(x, self.keep_outliers, self.protected)
            bias = outliers if bias is None else bias + outliers
        plan = M.bipartite_soft_matching(metric, r, state.history, self.protected, token_bias=bias)
        history = M.advance(state.history, plan)
        self._histories[index] = history
        self.tokens_per_layer[index + 1 : index + 2] = [history.num_tokens]
        merged = M.merge(plan, x, self.mode)
        if self.unmerge_detail:
            # Each token's deviation from its group, in original-token order, summed over layers.
            deviation = M.unmerge(state.history.source, x - M.unmerge(plan.index, merged))
            self._details[index] = deviation if detail is None else detail + deviation
        return merged

    def end_layer(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The output ``x`` of block ``index``; after the last block with ``unmerge_detail``,
        the tokens at the original length, each with its own detail added back."""
        detail = self._details[index]
        if index != self.num_layers - 1 or not self.unmerge_detail or detail is None:
            return x
        history = self._histories[index]
        if history is None or history.num_tokens == history.num_original:
            return x
        return M.unmerge(history.source, x) + detail.to(x.dtype)

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
        """Bring the model's merged tokens ``(B, N, ...)`` back to ``(B, N0, ...)``."""
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

    def options(self) -> dict:
        """The keyword options of :func:`tome.patch` this handle was made with."""
        return {
            "prop_attn": self.prop_attn,
            "unmerge_output": self.unmerge_output,
            "metric": self.metric,
            "energy": self.energy,
            "unmerge_detail": self.unmerge_detail,
            "mode": self.mode,
            "size_penalty": self.size_penalty,
            "keep_outliers": self.keep_outliers,
        }

    def __repr__(self) -> str:
        return (
            f"ToMeHandle(family={self.family!r}, r={self.r!r}, layers={self.num_layers}, "
            f"protected={self.protected}, prop_attn={self.prop_attn}, unmerge_output={self.unmerge_output})"
        )
