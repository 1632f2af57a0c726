"""Merging inside the vision tower too: the ``vision_r`` option of LLaVA.

With ``vision_r`` the vision tower's own layers merge tokens (tome's token-model patch of the
tower, :mod:`tome.adapters.transformers_vision`, with ``r=vision_r``): every tower layer after
the first merge runs on fewer tokens. The layer the language model reads
(``vision_feature_layer``) then hands over ``n' < n`` tokens per image, each with a size (how
many of the image's ``n`` patches it holds) and a source map (which of its tokens holds each
patch), read from the tower's merge history (:meth:`~tome.runtime.handle.ToMeHandle.history_of`).

The final merge before the language model continues that history instead of starting from
unit sizes (:func:`reduce_features_from`): the matching weighs each token by its size, a merged
token is the size-weighted mean of the tower tokens it holds (so every original patch counts
once), its size is the number of original patches it holds (what proportional attention adds
as ``log(size)``), and its source map is the tower's composed with the final merge's, over the
image's ``n`` patches: what :func:`~tome.adapters.common.vlm.shorten_prompts` and
:func:`~tome.adapters.common.vlm.size_bias` need to shorten each image's ``n`` placeholders.

Pieces, no ``nn.Module`` kept:

- :func:`reduce_features_from`: ``(I, n', D)`` tower features merged down to ``keep``, from
  their tower history;
- :func:`reduce_images_from`: each image's features so reduced to its kept count (counted, as
  without ``vision_r``, from the image's original tokens), with source maps over them;
- :func:`read_history`: the history of the features the model reads, from the tower's output;
- :func:`install_tower`: the tower patched by its own adapter, its handle returned;
- :class:`TowerVisualHandle`: :class:`~tome.adapters.common.dominant.DominantVisualHandle` with
  the ``vision_r`` option and the tower's handle.

>>> from tome.core import merge as M
>>> tower = M.MergeHistory(torch.tensor([[0, 0, 1, 2, 2, 2]]), torch.tensor([[2.0, 1.0, 3.0]]))
>>> feats = torch.randn(1, 3, 4)
>>> merged, history = reduce_features_from(tower, feats, 2)
>>> merged.shape, history.sizes.sum().item(), history.source.shape  # sizes count the 6 patches
(torch.Size([1, 2, 4]), 6.0, torch.Size([1, 6]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from tome.adapters.common.dominant import DominantVisualHandle
from tome.adapters.common.vlm import kept_tokens
from tome.core import merge as M
from tome.core.schedule import Schedule, check_schedule
from tome.runtime.options import Option

__all__ = [
    "TowerVisualHandle",
    "install_tower",
    "read_history",
    "reduce_features_from",
    "reduce_images_from",
]


# -- the final merge, from the tower's history ----------------------------------------------------


def reduce_features_from(
    history: M.MergeHistory, features: torch.Tensor, keep: int, protected: int = 0
) -> tuple[torch.Tensor, M.MergeHistory]:
    """``(I, n', D)`` features of tokens the tower already merged (``history``: their source
    map ``(I, n)`` over the original tokens and their sizes ``(I, n')``) -> ``(I, keep, D)``
    and the history over the ``n`` original tokens: as
    :func:`~tome.adapters.common.vlm.reduce_features` (bipartite soft matching on the
    features' own similarities, repeated halving steps, the first ``protected`` tokens never
    merged), but every token weighs its size: a merged token is the size-weighted mean of the
    tokens it holds, its size the number of original tokens it holds. Nothing merges when
    ``keep >= n'``.

    >>> h = M.MergeHistory(torch.tensor([[0, 1, 1, 1]]), torch.tensor([[1.0, 3.0]]))
    >>> x = torch.tensor([[[0.0, 1.0], [4.0, 1.0]]])
    >>> merged, out = reduce_features_from(h, x, 1)
    >>> merged.tolist(), out.sizes.tolist(), out.source.tolist()  # (0 * 1 + 4 * 3) / 4
    ([[[3.0, 1.0]]], [[4.0]], [[0, 0, 0, 0]])
    """
    if tuple(history.sizes.shape) != tuple(features.shape[:2]):
        raise ValueError(
            f"history: expected sizes of shape {tuple(features.shape[:2])} (one per feature token), "
            f"got {tuple(history.sizes.shape)}"
        )
    x = features
    keep = max(keep, protected + 1)
    while x.shape[1] > keep:
        r = min(x.shape[1] - keep, M.max_r(x.shape[1], protected))
        plan = M.bipartite_soft_matching(x, r, history, protected)  # in_sizes: the tower's sizes
        x = M.merge(plan, x, "mean")
        history = M.advance(history, plan)
    return x, history


def reduce_images_from(
    features: Sequence[torch.Tensor],
    history: M.MergeHistory,
    visual_tokens: int | None,
    visual_ratio: float | None,
    protected: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each image's tower features ``(n', D)`` (``history``: the batch's, one row per image,
    over ``n`` original tokens) reduced to ``min(n', kept_tokens(n, ...))`` tokens: the count
    is the one the image would keep without merging in the tower, so ``visual_tokens`` /
    ``visual_ratio`` mean what they mean without ``vision_r``. Returns the reduced features and
    each image's source map ``(n,)`` int64 over its ``n`` original tokens (what
    :func:`~tome.adapters.common.vlm.shorten_prompts` and
    :func:`~tome.adapters.common.vlm.size_bias` take, with ``before = n``). Images of one
    token count are reduced together; each one's result depends on it alone.

    >>> h = M.MergeHistory(torch.tensor([[0, 0, 1, 2]] * 2), torch.tensor([[2.0, 1.0, 1.0]] * 2))
    >>> merged, sources = reduce_images_from(list(torch.randn(2, 3, 4)), h, 2, None)
    >>> [m.shape[0] for m in merged], sources[0].shape
    ([2, 2], torch.Size([4]))
    """
    if history.sizes.shape[0] != len(features):
        raise ValueError(
            f"history: expected one row per image ({len(features)}), got {history.sizes.shape[0]}"
        )
    n = history.num_original
    groups: dict[int, list[int]] = {}
    for index, image in enumerate(features):
        groups.setdefault(image.shape[0], []).append(index)
    out: list[torch.Tensor] = list(features)
    sources: list[torch.Tensor] = list(history.source)
    for members in groups.values():
        keep = max(kept_tokens(n, visual_tokens, visual_ratio), protected + 1)
        rows = torch.tensor(members, device=history.source.device)
        start = M.MergeHistory(history.source[rows], history.sizes[rows])
        merged, done = reduce_features_from(
            start, torch.stack([features[i] for i in members]), keep, protected
        )
        for row, index in enumerate(members):
            out[index] = merged[row]
            sources[index] = done.source[row]
    return out, sources


def read_history(
    handle: object, hidden: torch.Tensor | None, block: int, drop_first: bool, images: int, n: int
) -> M.MergeHistory:
    """The merge history of the tower tokens the model reads: ``hidden``, the output of tower
    layer ``block`` (``-1``: the embeddings, which nothing merged), looked up in the tower's
    handle; without its first token when the model drops it (LLaVA's ``"default"`` strategy
    drops the class token, which the tower never merges: it stays first). ``images`` rows over
    ``n`` original tokens (the class token included)."""
    history = None if hidden is None or block < 0 else handle.history_of(hidden, block=block)
    if history is None:
        if block >= 0 and any(handle.r_per_layer[: block + 1]):
            raise RuntimeError(
                "vision_r: could not find the merge history of the vision layer the model reads; "
                "set model.tome.vision_r = None"
            )
        device = hidden.device if hidden is not None else None
        history = M.start_history(images, n, device)
    if not drop_first:
        return history
    # The class token is protected in the tower: token 0 holds original token 0 alone.
    return M.MergeHistory(history.source[:, 1:] - 1, history.sizes[:, 1:])


# -- the tower's patch ------------------------------------------------------------------------------


def install_tower(tower: nn.Module, schedule: Schedule) -> object:
    """Patch ``tower`` (a vision tower the transformers vision adapter supports: CLIP, SigLIP)
    with ``r=schedule`` by that adapter's own ``apply`` (proportional attention on, as
    ``tome.patch`` does by default; the sequence output stays merged: the model reads the
    merged tokens). Returns its :class:`~tome.runtime.handle.ToMeHandle`; ``handle._restore()``
    undoes it. Nothing is set on ``tower.tome``: the model's handle owns this one."""
    from tome.runtime.merge_options import MergeOptions
    from tome.runtime.registry import adapter_for

    adapter = adapter_for(tower)
    if adapter is None or adapter.name != "transformers_vision" or "tome" in tower.__dict__:
        raise TypeError(
            f"vision_r: merges inside a vision tower that tome's transformers vision adapter "
            f"patches (CLIPVisionModel, SiglipVisionModel), not yet patched; got a "
            f"{type(tower).__name__}{' already patched' if 'tome' in tower.__dict__ else ''}; "
            f"use vision_r=None"
        )
    try:  # the schedule is checked against the tower's layers before anything is installed
        handle = adapter.apply(
            tower, r=schedule, prop_attn=True, unmerge_output=False, options=MergeOptions()
        )
    except (TypeError, ValueError) as error:
        if not str(error).startswith("r: "):
            raise
        raise type(error)(f"vision_r: {str(error).removeprefix('r: ')}") from None
    handle.family = adapter.library
    return handle


# -- the option ---------------------------------------------------------------------------------


def _vision_r(name: str, value: object) -> Schedule | None:
    if value is None:
        return None
    try:
        check_schedule(value)
    except (TypeError, ValueError) as error:
        message = str(error).removeprefix("r: ")
        raise type(error)(f"{name}: the vision tower's r schedule: {message}") from None
    return value


class TowerVisualHandle(DominantVisualHandle):
    """``model.tome`` of a LLaVA model: the options of
    :class:`~tome.adapters.common.dominant.DominantVisualHandle` and :attr:`vision_r`.

    Attributes:
        vision_r: the vision tower's own ``r`` schedule (as ``tome.patch(vit, r=...)`` takes:
            an int, ``(r, inflection)`` or one int per layer): its layers merge tokens (a
            faster tower), and the final merge before the language model continues from the
            tower's sizes and sources. ``None`` (the default): the tower runs unmerged, as the
            model's own code. Settable afterwards only on a model patched with a ``vision_r``
            (0 then stops the tower's merging); not with ``visual_dominant``.
    """

    vision_r = Option(
        None,
        _vision_r,
        "the vision tower's own r schedule: its layers merge tokens too (a faster tower)",
    )

    def __setattr__(self, name: str, value: object) -> None:
        if name not in ("vision_r", "visual_dominant"):
            super().__setattr__(name, value)
            return
        key = "_" + name
        had, saved = key in self.__dict__, self.__dict__.get(key)
        super().__setattr__(name, value)

        def refuse(error: Exception) -> None:
            self.__dict__.pop(key, None)
            if had:
                self.__dict__[key] = saved
            raise error

        if self.visual_dominant and self.vision_r is not None:
            refuse(
                ValueError(
                    f"vision_r and visual_dominant: dominant tokens are read from the attention of the "
                    f"vision layer the model reads, over every one of its tokens; with tokens merged "
                    f"inside the tower they are not there to read. Give one of the two (got "
                    f"vision_r={self.vision_r!r}, visual_dominant={self.visual_dominant!r})"
                )
            )
        if name != "vision_r" or "_tower" not in self.__dict__:
            return  # still being built: apply installs the tower
        tower = self.__dict__["_tower"]
        if tower is None:
            if self.vision_r is not None:
                refuse(
                    ValueError(
                        f"vision_r: this model was patched with vision_r=None, so its vision tower is not "
                        f"patched; patch again: tome.patch(model, vision_r={self.vision_r!r}) (got "
                        f"vision_r={self.vision_r!r})"
                    )
                )
            return
        try:
            tower.r = 0 if self.vision_r is None else self.vision_r
        except (TypeError, ValueError) as error:  # a list longer than the tower's layers
            refuse(type(error)(f"vision_r: {str(error).removeprefix('r: ')}"))

    def tower(self) -> object | None:
        """The vision tower's :class:`~tome.runtime.handle.ToMeHandle` (``None``: the tower is
        not patched)."""
        return self.__dict__.get("_tower")

    def tower_merges(self) -> bool:
        """Whether the vision tower's schedule merges anything."""
        tower = self.tower()
        return tower is not None and (any(tower.r_per_layer) or bool(tower.ratio))

    def merges(self) -> bool:
        """Whether the settings merge anything at all (before the language model or in the
        tower: either way the prompt is shortened)."""
        return super().merges() or self.tower_merges()

    def dominant(self) -> bool:
        return super().merges() and bool(self.visual_dominant)

    def _restore(self) -> None:
        tower = self.tower()
        if tower is not None:
            tower._restore()
        super()._restore()

    def __repr__(self) -> str:
        return (
            super().__repr__()[:-1].replace("DominantVisualHandle(", "TowerVisualHandle(", 1)
            + f", vision_r={self.vision_r!r})"
        )
