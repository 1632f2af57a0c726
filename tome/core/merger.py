"""``TokenMerger``: the merge primitive, with argument checking, on top of :mod:`tome.core.merge`."""

from __future__ import annotations

import torch

from tome.core import merge as M
from tome.core.merge import MergeHistory

__all__ = ["TokenMerger"]


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _history_from_adm(adm: object, batch: int, num_tokens: int, device: torch.device) -> MergeHistory:
    """Accept our own history, or the seed's dense ``(B, N, N0)`` 0/1 adjacency matrix."""
    if isinstance(adm, torch.Tensor):
        if adm.dim() != 3 or adm.shape[:2] != (batch, num_tokens):
            raise ValueError(
                f"adm: expected a MergeHistory or a dense (B, N, N0) = ({batch}, {num_tokens}, N0) "
                f"matrix, got a tensor of shape {tuple(adm.shape)}"
            )
        # argmax has no bool kernel: read a bool matrix as 0/1 bytes
        source = (adm.to(torch.uint8) if adm.dtype == torch.bool else adm).argmax(dim=1)
        sizes = adm.float().sum(-1)
        adm = MergeHistory(source.to(device), sizes.to(device))
    if not isinstance(adm, MergeHistory):
        raise TypeError(f"adm: expected the .adm of a previous TokenMerger, got {type(adm).__name__}")
    if tuple(adm.sizes.shape) != (batch, num_tokens):
        raise ValueError(
            f"adm: it belongs to {tuple(adm.sizes.shape)} (B, N) tokens, but keys have "
            f"(B, N) = ({batch}, {num_tokens}); pass the adm of the merger that produced these tokens"
        )
    if adm.sizes.device != device:
        raise ValueError(f"adm: on {adm.sizes.device}, but keys are on {device}")
    return adm


class TokenMerger:
    """Merge the ``r`` most similar tokens of a sequence, and undo it.

    Bipartite soft matching on the cosine similarity of ``keys`` (Bolya et al., ICLR 2023).
    The merged sequence keeps the surviving tokens in their original order, so the first
    ``protected`` tokens (class token, registers) stay at positions ``0..protected-1``.

    Args:
        keys: ``(B, N, D)`` similarity features, e.g. attention keys averaged over heads.
            A key with a NaN/inf entry counts as all 0; an all-zero key has similarity 0 to
            every token.
        r: number of tokens to remove; at most half the unprotected tokens.
        adm: the ``.adm`` of the merger that produced these tokens, to chain layers: sizes make
            repeated means exact and ``unmerge`` goes back to the very first sequence. The
            seed's dense ``(B, N, N0)`` 0/1 matrix is accepted too.
        sequence_ids: ``(B, N)`` integer ids (several sequences packed in one row): tokens with
            different ids never merge; padding tokens (id ``mask_id``) merge with each other
            first.
        mask_id: the padding id.
        protected: the first ``protected`` tokens are never merged.
        validate: check with ``sequence_ids`` that ``r`` merges stay within ids. That check
            reads a value back from the device, so by default (``None``) it runs only on CPU
            tensors outside ``torch.compile``.

    Example:
        >>> keys = torch.randn(32, 128, 768)
        >>> tm = TokenMerger(keys, 32)
        >>> merged = tm(torch.randn(32, 128, 64))
        >>> merged.shape, tm.unmerge(merged).shape
        (torch.Size([32, 96, 64]), torch.Size([32, 128, 64]))
        >>> x = torch.randn(1, 16, 2)
        >>> tm1 = TokenMerger(x, 4)
        >>> tm2 = TokenMerger(tm1(x), 4, adm=tm1.adm)
        >>> tm2.unmerge(tm2(tm1(x))).shape, tm2.sizes.sum().item()
        (torch.Size([1, 16, 2]), 16.0)
    """

    def __init__(
        self,
        keys: torch.Tensor,
        r: int,
        adm: MergeHistory | torch.Tensor | None = None,
        sequence_ids: torch.Tensor | None = None,
        mask_id: int = -100,
        protected: int = 0,
        validate: bool | None = None,
    ) -> None:
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"keys: expected a torch.Tensor, got {type(keys).__name__}")
        if keys.dim() != 3:
            raise ValueError(f"keys: expected shape (B, N, D), got {tuple(keys.shape)}")
        if not keys.is_floating_point():
            raise TypeError(f"keys: expected a floating point tensor, got {keys.dtype}")
        B, N = keys.shape[:2]
        for name, value in (("r", r), ("protected", protected), ("mask_id", mask_id)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
        if protected < 0 or (protected > 0 and protected >= N):
            raise ValueError(f"protected: expected 0 <= protected < N = {N}, got {protected}")
        if r < 0:
            raise ValueError(f"r: expected r >= 0, got {r}")
        limit = M.max_r(N, protected)
        if r > limit:
            raise ValueError(
                f"r: at most {limit} tokens can be merged (half of the N - protected = "
                f"{N - protected} unprotected tokens), got r = {r}"
            )
        if sequence_ids is not None:
            self._check_sequence_ids(sequence_ids, keys)
        history = (
            M.start_history(B, N, keys.device) if adm is None else _history_from_adm(adm, B, N, keys.device)
        )

        plan = M.bipartite_soft_matching(keys, r, history, protected, sequence_ids, mask_id)
        if sequence_ids is not None and r > 0:
            if validate is None:
                validate = keys.device.type == "cpu" and not _is_compiling()
            if validate:
                self._check_r_within_ids(keys, r, protected, sequence_ids, mask_id)

        self.r = r
        self.protected = protected
        self.plan = plan
        self.adm = M.advance(history, plan)
        self.merged_ids = None if sequence_ids is None else M.merge(plan, sequence_ids, "drop")

    @staticmethod
    def _check_sequence_ids(sequence_ids: torch.Tensor, keys: torch.Tensor) -> None:
        if not isinstance(sequence_ids, torch.Tensor):
            raise TypeError(f"sequence_ids: expected a torch.Tensor, got {type(sequence_ids).__name__}")
        if tuple(sequence_ids.shape) != tuple(keys.shape[:2]):
            raise ValueError(
                f"sequence_ids: expected shape (B, N) = {tuple(keys.shape[:2])}, got {tuple(sequence_ids.shape)}"
            )
        if sequence_ids.is_floating_point() or sequence_ids.is_complex() or sequence_ids.dtype == torch.bool:
            raise TypeError(f"sequence_ids: expected an integer tensor, got {sequence_ids.dtype}")
        if sequence_ids.device != keys.device:
            raise ValueError(f"sequence_ids: on {sequence_ids.device}, but keys are on {keys.device}")

    @staticmethod
    def _check_r_within_ids(
        keys: torch.Tensor, r: int, protected: int, sequence_ids: torch.Tensor, mask_id: int
    ) -> None:
        score, _ = M.best_edges(keys, protected, sequence_ids, mask_id)
        possible = int(torch.isfinite(score).sum(dim=-1).min()) if score.shape[0] else r
        if r > possible:
            raise ValueError(
                f"r: with these sequence_ids at most {possible} tokens can be merged without mixing "
                f"ids (A tokens with a same-id partner in B), got r = {r}"
            )

    # -- results -------------------------------------------------------------------------------

    @property
    def sizes(self) -> torch.Tensor:
        """``(B, N - r)`` float32: how many original tokens each merged token holds."""
        return self.adm.sizes

    @property
    def source(self) -> torch.Tensor:
        """``(B, N0)`` int64: index in the merged sequence of the token each original token
        belongs to."""
        return self.adm.source

    # -- operations ----------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        return self.merge(x, mode)

    def merge(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """Merge ``x`` of shape ``(B, N, ...)`` into ``(B, N - r, ...)``.

        Modes: ``"mean"`` (size-weighted: the true mean of the original tokens), ``"sum"``,
        ``"amax"``, ``"amin"``, ``"drop"`` (merged tokens discarded), ``"mlerp"`` (mean
        rescaled to the largest norm in the group). Integer/bool tensors keep their dtype.
        """
        if mode not in M.MODES:
            raise ValueError(f"mode: expected one of {', '.join(M.MODES)}, got {mode!r}")
        self._check_tokens(x, self.plan.index.shape, "x", "the keys")
        if mode in ("mean", "mlerp") and not (x.is_floating_point() or x.is_complex()):
            raise TypeError(
                f"x: mode {mode!r} needs a floating point tensor, got {x.dtype}; "
                "use mode 'sum', 'amax', 'amin' or 'drop', or convert x"
            )
        return M.merge(self.plan, x, mode)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N - r, ...)`` -> ``(B, N0, ...)``: every original token (before the first
        chained merger) gets the value of the merged token it ended up in."""
        self._check_tokens(x, self.sizes.shape, "x", "the merged tokens")
        return M.unmerge(self.source, x)

    def merge_original(self, x: torch.Tensor) -> torch.Tensor:
        """Average a per-original-token tensor ``(B, N0, ...)`` over the merged groups, giving
        ``(B, N - r, ...)``: e.g. the mean pixel colour of every group (the seed's
        ``merge_all``)."""
        self._check_tokens(x, self.source.shape, "x", "the original tokens")
        return M.merge_original(self.adm, x)

    merge_all = merge_original

    def dense_adm(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(B, N - r, N0)`` 0/1 membership matrix, for inspection (O(B·N·N0) memory)."""
        return self.adm.dense(dtype)

    def _check_tokens(self, x: torch.Tensor, expected: torch.Size, name: str, what: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or tuple(x.shape[:2]) != tuple(expected):
            raise ValueError(
                f"{name}: expected shape (B, N, ...) with (B, N) = {tuple(expected)} as for {what}, "
                f"got {tuple(x.shape)}"
            )
        if x.device != self.plan.index.device:
            raise ValueError(f"{name}: on {x.device}, but the keys were on {self.plan.index.device}")

    def __repr__(self) -> str:
        B, N = self.plan.index.shape
        return f"TokenMerger(B={B}, N={N}, r={self.r}, protected={self.protected}, N0={self.source.shape[1]})"
