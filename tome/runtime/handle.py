"""``ToMeHandle``: the handle (``model.tome``) of a patched token model, and the block protocol.

:class:`~tome.runtime.base.PatchHandle` gives every handle its options, installing and undoing,
copies and pickles; this handle adds what merging between the blocks of a token model needs:
the schedule (``r`` or ``ratio``), ``prop_attn``, ``unmerge_output``, the
:class:`~tome.runtime.merge_options.MergeOptions`, the block protocol below, the results of the
latest pass and :meth:`~ToMeHandle.unmerge`. It holds settings only; everything a forward pass
merges lives in that pass's own :class:`~tome.runtime.passes.PassState`, which travels with the
token tensors (:mod:`tome.runtime.passes`). One patched model can therefore run in several
threads at once, be deep-copied, pickled and exported like any module.

Adapters (one per framework) re-compose each transformer block from the library's own
submodules and call the handle at these points of every block::

    call = handle.begin_layer(i, x)                   # the pass of x, and its history
    bias = handle.attention_bias(call, x.dtype)       # log(size) mask, or None
    ... attention(x, mask=bias), residual ...         # per-head keys k: (B, N, heads, head_dim)
    metric = handle.similarity_features(k) if handle.wants_keys(i, N) else None
    x = handle.merge_layer(call, x, metric)           # between attention and MLP
    ... MLP, residual ...
    x = handle.end_layer(call, x)                     # registers x with its pass; after the
                                                      # last block: unmerge + detail
Adapters that read the keys with a forward hook hand them over with :meth:`offer_keys` /
:meth:`take_keys` (a per-thread slot that lives only during one block call).

``MergeOptions`` (:mod:`tome.runtime.merge_options`), ``PatchHandle`` (:mod:`tome.runtime.base`)
and ``PatchedModels`` (:mod:`tome.runtime.models`) are importable from here too.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import asdict

import torch

from tome.core import merge as M
from tome.core.merge import MergeHistory
from tome.core.schedule import Schedule, check_ratio, check_schedule, resolve_schedule
from tome.runtime.base import PatchHandle
from tome.runtime.merge_options import MERGE_MODES, METRICS, MergeOptions
from tome.runtime.models import PatchedModels
from tome.runtime.options import flag
from tome.runtime.passes import BlockCall, PassState, TokenRegistry

__all__ = [
    "MERGE_MODES",
    "METRICS",
    "BlockCall",
    "MergeOptions",
    "PatchHandle",
    "PatchedModels",
    "ToMeHandle",
    "current_sequence_ids",
    "detail",
]


def _is_tracing() -> bool:
    # torch.compile / torch.export trace with fake tensors: nothing to look up in a registry.
    return torch.compiler.is_compiling()


class _KeySlot(threading.local):
    """Per-thread hand-over of the matching metric from a key hook to its block."""

    value: torch.Tensor | None = None


def current_sequence_ids(call: BlockCall) -> torch.Tensor | None:
    """The document id of every current token of a packed pass (``tome_sequence_ids``), or
    ``None`` for a pass that is not packed: tokens merge only within a document, so every
    original token of a group has its group's id (``-100``: a group of padding only)."""
    ids = call.pass_state.sequence_ids
    if ids is None or not call.merged:
        return ids
    current = torch.full(call.history.sizes.shape, -100, dtype=ids.dtype, device=ids.device)
    return current.scatter(1, call.history.source, ids)


class ToMeHandle(PatchHandle):
    """Settings of a patched token model (a ViT, a text encoder: every family but the diffusion
    models), reachable as ``model.tome``, and the results of its latest forward pass.

    Attributes:
        r: the schedule (int, per-layer list or ``(r, inflection)``); settable.
        prop_attn: add ``log(size)`` to attention logits (proportional attention); settable.
        unmerge_output: return the model's token outputs at the original length; settable.
        options: the :class:`MergeOptions` the model was patched with (fixed; patch again to
            change them).
        protected: leading tokens never merged (class/distillation/register tokens).
        num_layers: number of patched blocks.

    Results (:attr:`source`, :attr:`sizes`, :attr:`history`, :attr:`tokens_per_layer`) describe
    the forward pass that finished last, in any thread. When several threads share the model,
    :meth:`unmerge` and :meth:`history_of` follow the tokens they are given to the pass that
    made them, so each thread gets its own pass's answer.
    """

    # Whether the metric adapters pass to :meth:`merge_layer` is unit-norm per token already
    # (:func:`tome.core.merge.unit_features`), so matching does not normalize it again.
    unit_metric: bool = False
    # Per-pass bookkeeping (see PatchHandle): built by _init_transient.
    _transient = ("_registry", "_keys", "_last", "_tracing", "_traced_keys", "_warned_cap")

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
        ratio: float | None = None,
        **family_options: object,
    ) -> None:
        super().__init__(num_layers, family=family, **family_options)
        self.protected = protected
        self.prop_attn = prop_attn
        self.unmerge_output = unmerge_output
        self.options = MergeOptions() if options is None else options
        self.r = r
        if ratio is not None:
            self.ratio = ratio

    def _init_transient(self) -> None:
        super()._init_transient()
        # Per-pass bookkeeping: never copied, pickled or shared with a copy.
        self._registry = TokenRegistry()
        self._keys = _KeySlot()
        self._last: PassState | None = None
        self._tracing: tuple[PassState, int] | None = None
        self._traced_keys: torch.Tensor | None = None
        self._warned_cap = False

    # -- settings ------------------------------------------------------------------------------

    @property
    def r(self) -> Schedule:
        return self._r

    @r.setter
    def r(self, value: Schedule) -> None:
        check_schedule(value)
        self._r_per_layer = resolve_schedule(value, self.num_layers)
        self._r = value
        self._ratio = None
        self._warned_cap = False

    @property
    def ratio(self) -> float | None:
        """The fraction of each row's mergeable tokens every block removes, or ``None`` when
        the schedule is ``r``; settable (setting ``r`` clears it, setting it replaces ``r``)."""
        return self._ratio

    @ratio.setter
    def ratio(self, value: float | None) -> None:
        if value is None:
            self.r = 0
            return
        value = check_ratio(value)
        self._r = None
        self._r_per_layer = [0] * self.num_layers
        self._ratio = value

    @property
    def prop_attn(self) -> bool:
        return self._prop_attn

    @prop_attn.setter
    def prop_attn(self, value: bool) -> None:
        self._prop_attn = flag("prop_attn", value)

    @property
    def unmerge_output(self) -> bool:
        return self._unmerge_output

    @unmerge_output.setter
    def unmerge_output(self, value: bool) -> None:
        self._unmerge_output = flag("unmerge_output", value)

    @property
    def r_per_layer(self) -> list[int]:
        """The schedule resolved to one int per layer (before capping at what each layer can
        merge)."""
        return list(self._r_per_layer)

    def patch_options(self) -> dict:
        """The keyword options of :func:`tome.patch` this handle has now (for patching again)."""
        schedule = {"r": self.r} if self.ratio is None else {"ratio": self.ratio}
        return {
            **schedule,
            "prop_attn": self.prop_attn,
            "unmerge_output": self.unmerge_output,
            **asdict(self.options),
            **super().patch_options(),
        }

    def planned_tokens(self, num_tokens: int) -> list[int]:
        """Token counts the current schedule gives for ``num_tokens`` input tokens: entering
        block 0, then after each block (each capped at what it can merge). Unlike
        :attr:`tokens_per_layer` it needs no forward pass and follows ``r`` at once.

        >>> ToMeHandle(3, 4, protected=1).planned_tokens(17)
        [17, 13, 9, 5]
        """
        counts = [num_tokens]
        for index in range(self.num_layers):
            num_tokens -= self._removed(index, num_tokens)
            counts.append(num_tokens)
        return counts

    def _removed(self, index: int, num_tokens: int) -> int:
        cap = M.max_r(num_tokens, self.protected)
        if self._ratio is not None:
            return min(int(max(num_tokens - self.protected, 0) * self._ratio + 1e-9), cap)
        return min(self._r_per_layer[index], cap)

    # -- the block protocol (used by adapters) -------------------------------------------------

    def _find(self, x: torch.Tensor) -> tuple[PassState, int] | None:
        if _is_tracing():
            return self._tracing
        return self._registry.lookup(x)

    def follow(self, tokens: torch.Tensor, source: torch.Tensor) -> None:
        """Record that ``tokens`` are a per-token function of ``source`` (a final norm's output
        from its input): they belong to the same pass and block."""
        if _is_tracing() or tokens.shape[:2] != source.shape[:2]:
            return
        found = self._registry.lookup(source)
        if found is not None:
            self._registry.register(tokens, *found)

    def begin_layer(self, index: int, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> BlockCall:
        """The call of block ``index`` on tokens ``x`` (B, N, C): block 0 starts a new pass;
        block ``i`` continues the pass whose block ``i - 1`` produced ``x``. ``key_mask``
        (block 0 only): ``(B, N)`` bool, False for padding tokens, which then never merge
        with real ones and are never attended to."""
        B, N = x.shape[:2]
        if index == 0:
            pass_state = PassState(self.num_layers, key_valid=key_mask)
            pass_state.tokens.append(N)
            history = M.start_history(B, N, x.device)
            if key_mask is not None:
                if tuple(key_mask.shape) != (B, N):
                    raise ValueError(f"key_mask: expected shape {(B, N)}, got {tuple(key_mask.shape)}")
                # Padding holds no original token: size 0 (so it never weighs in a merge).
                history = M.MergeHistory(history.source, key_mask.to(torch.float32))
            return BlockCall(pass_state, 0, history, merged=False, valid=key_mask)
        found = self._find(x)
        history = None
        if found is not None and found[1] == index - 1:
            history = found[0].histories[index - 1]
        if history is None or tuple(history.sizes.shape) != (B, N):
            raise RuntimeError(
                f"tome: block {index} received {N} tokens for batch {B}, which do not come from "
                f"block {index - 1} of a forward pass of this model; patched blocks must run in "
                "order, starting with block 0"
            )
        pass_state = found[0]
        merged = history.num_original != history.num_tokens
        # In a padded pass a token is real if it holds a real original (size > 0).
        valid = None if pass_state.key_valid is None else history.sizes > 0
        return BlockCall(pass_state, index, history, merged=merged, valid=valid)

    @staticmethod
    def key_mask_from(attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` bool key validity of a ``(B, 1 or heads, Nq, N)`` attention mask (bool: True
        attends; float: 0 attends, very negative masks), read as a key-padding mask: a key is
        valid if some query may attend to it."""
        if attention_mask.dtype == torch.bool:
            return attention_mask.any(dim=-2).any(dim=1)
        threshold = torch.finfo(attention_mask.dtype).min / 2
        return (attention_mask > threshold).any(dim=-2).any(dim=1)

    def attention_bias(self, call: BlockCall, dtype: torch.dtype) -> torch.Tensor | None:
        """Proportional attention mask ``(B, 1, 1, N)`` = log(size), or ``None`` when it
        would be all zeros (nothing merged yet, or ``prop_attn`` off). In a pass with padding
        (``key_mask``), merged tokens get the mask too: padding keys at the dtype's minimum."""
        if call.valid is not None and call.merged:
            sizes = call.history.sizes
            bias = sizes.clamp_min(1).log() if self.prop_attn else torch.zeros_like(sizes)
            bias = bias.masked_fill(~call.valid, torch.finfo(dtype).min)
            return bias.to(dtype)[:, None, None, :]
        if not (self.prop_attn and call.merged):
            return None
        return M.attention_bias(call.history.sizes, dtype)

    def layer_r(self, index: int, num_tokens: int) -> int:
        """Tokens block ``index`` removes from ``num_tokens``: its schedule entry (or its
        ``ratio`` of the mergeable tokens), capped at what it can merge."""
        removed = self._removed(index, num_tokens)
        wanted = self._r_per_layer[index]
        if self._ratio is None and wanted > removed and not self._warned_cap and not _is_tracing():
            self._warned_cap = True
            warnings.warn(
                f"tome: the schedule r={self.r!r} asks block {index} to merge "
                f"{wanted} of its {num_tokens} tokens; a block merges at most "
                f"half its unprotected tokens, so it merges {removed} (see "
                "model.tome.planned_tokens(n) for the counts; warned once per schedule)",
                stacklevel=3,
            )
        return removed

    def rows_removed(self, index: int, valid_tokens: torch.Tensor) -> torch.Tensor:
        """``(B,)``: tokens block ``index`` removes from each row of a padded batch, from that
        row's own count of real tokens ``valid_tokens`` (B,) (adapters may add a rule of their
        own, e.g. a floor; it must depend on the row alone)."""
        return M.per_row_r(valid_tokens, self.protected, self._r_per_layer[index], self._ratio)

    def schedules_merges(self, index: int) -> bool:
        """Whether the schedule asks block ``index`` to merge anything (before capping)."""
        return (self._ratio is not None and self._ratio > 0) or self._r_per_layer[index] > 0

    def wants_keys(self, index: int, num_tokens: int) -> bool:
        """Whether block ``index`` (with ``num_tokens`` tokens) needs the keys: it merges."""
        return self._removed(index, num_tokens) > 0

    def similarity_features(self, keys: torch.Tensor) -> torch.Tensor:
        """The matching metric from per-head keys ``(B, N, heads, head_dim)``."""
        with self.merge_step_part(keys):
            return self.options.similarity_features(keys)

    def offer_keys(self, index: int, keys: torch.Tensor) -> None:
        """From a key hook: per-head keys ``(B, N, heads, head_dim)`` of the block ``index``
        running in this thread; kept (as the matching metric) only if that block merges."""
        if self.wants_keys(index, keys.shape[1]):
            if _is_tracing():  # tracing is single-threaded, and guards on thread-locals fail
                self._traced_keys = self.similarity_features(keys)
            else:
                self._keys.value = self.similarity_features(keys)

    def take_keys(self) -> torch.Tensor | None:
        """The metric :meth:`offer_keys` left for the block running in this thread (once)."""
        if _is_tracing():
            value, self._traced_keys = self._traced_keys, None
            return value
        value = self._keys.value
        self._keys.value = None
        return value

    def _tracks_detail(self) -> bool:
        return self.options.unmerge_detail and self.unmerge_output

    def merge_layer(self, call: BlockCall, x: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
        """Merge ``x`` (B, N, C) by the similarity of ``metric`` (B, N, D), from
        :meth:`similarity_features`; record the history in the call's pass. ``metric`` may be
        ``None`` where the block removes nothing (:meth:`wants_keys` is False)."""
        # Many small ops: on the calling thread alone where that is faster (a busy machine
        # stalls every parallel region; tome/core/threads.py).
        with self.merge_step(x):
            return self._merge_layer(call, x, metric)

    def _merge_layer(self, call: BlockCall, x: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
        index, state = call.index, call.pass_state
        r = self.layer_r(index, x.shape[1])
        # Slot assignments, not appends: a block recomputed by gradient checkpointing (during
        # backward, last block first) rewrites its own entries and keeps the later ones.
        state.deviations[index] = None
        if r == 0:
            state.histories[index] = call.history
            state.tokens[index + 1 : index + 2] = [x.shape[1]]
            return x
        if metric is None:
            raise RuntimeError(f"tome: block {index} merges {r} tokens but its adapter passed no keys")
        bias = None
        if self.options.keep_outliers:
            # Padding zeroed for the ranking: with norm 0 it never takes a real token's place
            # among the kept outliers. (Folded into a real token, padding changes nothing
            # anyway: merging zeroes tokens of size 0.)
            valid = call.valid
            ranked = x if valid is None else torch.where(valid[..., None], x, 0)
            bias = M.outlier_bias(ranked, self.options.keep_outliers, self.protected)
        plan = self._plan(call, x, metric, r, bias)
        history = M.advance(call.history, plan)
        state.histories[index] = history
        state.tokens[index + 1 : index + 2] = [history.num_tokens]
        merged = M.merge(plan, x, self.options.mode)
        if self._tracks_detail():
            state.deviations[index] = (*M.merge_residuals(plan, x, merged), plan.index)
        return merged

    def _plan(
        self, call: BlockCall, x: torch.Tensor, metric: torch.Tensor, r: int, bias: torch.Tensor | None
    ) -> M.MergePlan:
        """The merge plan of a block that removes ``r > 0`` tokens of ``x`` by ``metric``
        (``bias``: the outlier bias, or ``None``); a family with its own matching overrides it."""
        unit = self.unit_metric
        if call.valid is None:
            return M.bipartite_soft_matching(
                metric, r, call.history, self.protected, token_bias=bias, normalized=unit
            )
        # Padded batch: every row merges by its own tokens alone.
        real = call.valid.sum(dim=1)
        row_r = self.rows_removed(call.index, real).clamp_max(r)
        return M.masked_soft_matching(
            metric,
            r,
            row_r,
            call.history,
            self.protected,
            sequence_ids=current_sequence_ids(call),
            token_bias=bias,
            normalized=unit,
        )

    def end_layer(self, call: BlockCall, x: torch.Tensor) -> torch.Tensor:
        """The output ``x`` of a block call, registered with its pass for the next block; after
        the last block, with ``unmerge_output`` and ``unmerge_detail``, the tokens at the
        original length, each with its detail."""
        index, state = call.index, call.pass_state
        last = index == self.num_layers - 1
        if last and self._tracks_detail():
            history = state.histories[index]
            if history is not None and history.num_tokens != history.num_original:
                x = M.unmerge(history.source, x) + detail(state).to(x.dtype)
            if not torch.is_grad_enabled():
                # No recomputation can need them: free the residuals (B, N, C per block) now.
                state.deviations = [None] * self.num_layers
        if _is_tracing():
            self._tracing = (state, index)
        else:
            self._registry.register(x, state, index)
        if last and not torch.compiler.is_exporting():
            # torch.compile replays this write with the graph's real outputs; torch.export would
            # leave the trace's fake tensors as the "latest pass".
            self._last = state
        return x

    # -- results -------------------------------------------------------------------------------

    def history_of(self, tokens: torch.Tensor, block: int | None = None) -> MergeHistory | None:
        """The history of ``tokens``: an output of a patched block (or of the model's final
        norm) of a pass whose tokens are still alive, or ``None`` if ``tokens`` came from
        elsewhere. With ``block``: the history after that block of the pass ``tokens``
        belong to (while ``torch.compile`` / ``torch.export`` trace: of the pass being traced),
        e.g. for the hidden states of intermediate layers."""
        if _is_tracing():
            if block is None or self._tracing is None:
                return None
            return self._tracing[0].histories[block]
        found = self._registry.lookup(tokens)
        if found is None:
            return None
        return found[0].histories[found[1] if block is None else block]

    @property
    def history(self) -> MergeHistory | None:
        """History after the last block of the latest finished forward pass (None before any)."""
        return None if self._last is None else self._last.history

    @property
    def source(self) -> torch.Tensor | None:
        """``(B, N0)``: index of the output token that holds each input token (latest pass)."""
        return None if self.history is None else self.history.source

    @property
    def sizes(self) -> torch.Tensor | None:
        """``(B, N)``: how many input tokens each output token holds (latest pass)."""
        return None if self.history is None else self.history.sizes

    @property
    def tokens_per_layer(self) -> list[int]:
        """Token counts of the latest finished pass: entering block 0, then after each block
        (empty before the first pass; :meth:`planned_tokens` gives the counts of the current
        schedule without a pass)."""
        return [] if self._last is None else list(self._last.tokens)

    def unmerge(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bring merged tokens ``(B, N, ...)`` back to ``(B, N0, ...)`` (every original token
        gets its group's value; no detail). Tokens that a patched block (or the final norm)
        produced are unmerged by their own pass, so this is exact under concurrent use; other
        tensors (e.g. computed from the output) by the latest finished pass."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
            raise TypeError(f"tokens: expected a (B, N, ...) tensor, got {type(tokens).__name__}")
        history = self.history_of(tokens)
        if history is None:
            if _is_tracing() and self._tracing is not None:
                history = self._tracing[0].history
            else:
                history = self.history
        if history is None:
            raise RuntimeError("tome: run a forward pass of the patched model before unmerge()")
        if tuple(tokens.shape[:2]) == tuple(history.source.shape):
            return tokens  # already at the original length
        if tuple(tokens.shape[:2]) != tuple(history.sizes.shape):
            raise ValueError(
                f"tokens: expected (B, N, ...) with (B, N) = {tuple(history.sizes.shape)} (the output of "
                f"the latest forward pass), got {tuple(tokens.shape)}"
            )
        return M.unmerge(history.source, tokens)

    def __repr__(self) -> str:
        return (
            f"ToMeHandle(family={self.family!r}, r={self.r!r}, layers={self.num_layers}, "
            f"protected={self.protected}, prop_attn={self.prop_attn}, unmerge_output={self.unmerge_output}, "
            f"options={self.options})"
        )


def detail(state: PassState, num_blocks: int | None = None) -> torch.Tensor:
    """Every original token's summed residuals ``(B, N0, C)`` over the first ``num_blocks``
    blocks of a pass (all by default): from the last block down, each block's sum is carried to
    its input tokens (one gather by the plan's index) and that block's own residuals are added
    to the rows its merge changed; block 0's input tokens are the originals."""
    total = None
    for entry in reversed(state.deviations[:num_blocks]):
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
