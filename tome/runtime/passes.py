"""Per-pass state of a patched model: what one forward pass has merged so far.

A forward pass owns a :class:`PassState`; the model (and its :class:`~tome.runtime.handle.ToMeHandle`)
owns only settings. Block ``i + 1`` finds the pass of the tokens it receives through a
:class:`TokenRegistry`: block ``i`` registers its output tensor with its pass, and the next block
looks the tensor up. So the state travels with the tokens, never through the model:

- several threads can run one model at once: each pass has its own tensors, hence its own state;
- gradient checkpointing recomputes a block from the very input tensor it saved (or, with
  reentrant checkpointing, a detached view of its storage), which finds the same pass;
- a copied, pickled or exported model carries no pass at all (the registry is transient).

While ``torch.compile`` / ``torch.export`` trace the model there are no real tensors to look up;
the pass is then handed from block to block through the handle for the duration of the trace
(tracing is single-threaded), and lives in the compiled graph as ordinary intermediate values.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch

from tome.core.merge import MergeHistory

__all__ = ["BlockCall", "PassState", "TokenRegistry"]


@dataclass(eq=False)
class PassState:
    """What one forward pass of a patched model has merged so far.

    Attributes:
        histories: per block, the history of its output tokens (``None`` before it ran).
        deviations: per block, what ``unmerge_detail`` needs of its merge (or ``None``).
        tokens: the token count entering block 0, then the count after each block that ran.
        key_valid: ``(B, N0)`` bool, which original tokens may be attended to (False: padding),
            when the model passed an attention mask to block 0; ``None``: all of them.
        sequence_ids: ``(B, N0)`` document ids of packed rows (``-100`` at padding), or ``None``.
    """

    num_layers: int
    key_valid: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None
    histories: list[MergeHistory | None] = field(default_factory=list)
    deviations: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.histories = [None] * self.num_layers
        self.deviations = [None] * self.num_layers

    @property
    def last_block(self) -> int:
        """Index of the deepest block that has run (-1 before block 0 finished)."""
        return len(self.tokens) - 2

    @property
    def history(self) -> MergeHistory | None:
        """History of the tokens after the deepest block that has run."""
        index = self.last_block
        return self.histories[index] if index >= 0 else None


@dataclass(frozen=True, eq=False)
class BlockCall:
    """One call of one patched block: the pass it belongs to and the history of its input
    tokens. ``merged`` (a Python bool) says whether anything was merged before, so the unmerged
    fast path needs no tensor check. ``valid``: ``(B, N)`` bool, which input tokens hold real
    (not padding) tokens, when the pass has a mask."""

    pass_state: PassState
    index: int
    history: MergeHistory
    merged: bool
    valid: torch.Tensor | None = None


def _storage_key(x: torch.Tensor) -> tuple:
    # A detached view (reentrant checkpointing recomputes from ``x.detach()``) shares storage,
    # offset, shape and strides with the tensor it came from: it belongs to the same pass.
    try:
        pointer = x.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without storage
        pointer = ("object", id(x))
    return (x.device, pointer, x.storage_offset(), tuple(x.shape), tuple(x.stride()))


class TokenRegistry:
    """Which pass, and which block of it, produced a token tensor that is still alive.

    Entries hold the tensor weakly and vanish with it, so a registry never keeps activations
    alive; it holds a pass's histories (small integer maps) only as long as one of its token
    tensors lives. Dictionary updates are atomic, so threads need no lock.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[weakref.ref, PassState, int]] = {}

    def register(self, x: torch.Tensor, pass_state: PassState, block: int) -> None:
        key = _storage_key(x)
        ref = weakref.ref(x, functools.partial(self._forget, key))
        self._entries[key] = (ref, pass_state, block)

    def lookup(self, x: torch.Tensor) -> tuple[PassState, int] | None:
        entry = self._entries.get(_storage_key(x))
        if entry is None or entry[0]() is None:
            return None
        return entry[1], entry[2]

    def _forget(self, key: tuple, ref: weakref.ref) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is ref:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
