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

__all__ = ["LayerState", "ToMeHandle"]


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
        family: str = "",
    ) -> None:
        self.num_layers = num_layers
        self.protected = protected
        self.prop_attn = bool(prop_attn)
        self.unmerge_output = bool(unmerge_output)
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
        # Slot assignments, not truncation: a block recomputed by gradient checkpointing (during
        # backward, last block first) rewrites its own count and keeps the later ones.
        if r == 0:
            self._histories[index] = state.history
            self.tokens_per_layer[index + 1 : index + 2] = [x.shape[1]]
            return x
        plan = M.bipartite_soft_matching(keys, r, state.history, self.protected)
        history = M.advance(state.history, plan)
        self._histories[index] = history
        self.tokens_per_layer[index + 1 : index + 2] = [history.num_tokens]
        return M.merge(plan, x, "mean")

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

    def __repr__(self) -> str:
        return (
            f"ToMeHandle(family={self.family!r}, r={self.r!r}, layers={self.num_layers}, "
            f"protected={self.protected}, prop_attn={self.prop_attn}, unmerge_output={self.unmerge_output})"
        )
