"""``MergeOptions``: how a patched token model merges (the options of :func:`tome.patch` fixed when
patching)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["MERGE_MODES", "METRICS", "MergeOptions"]

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
