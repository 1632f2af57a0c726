"""AnyRes images (LLaVA-NeXT, LLaVA-OneVision): merge an image's packed features, newlines apart.

An AnyRes model cuts an image into crops of the vision tower's size and packs each image's
projected features into one sequence: the base (whole, low-resolution) image's tokens, then the
crops' tokens stitched into one grid, unpadded, with the model's learned ``image_newline``
vector after every row of it. So an image of ``n`` tokens is ``V`` visual tokens and ``R``
newline tokens, all ``R`` of them the same vector.

:func:`reduce_packed` merges such an image to :func:`~tome.adapters.common.vlm.kept_tokens`
``(n)`` tokens: its ``V`` visual tokens (base and crops, one set: the base view repeats what
the crops show, at a coarser scale, which is redundancy a merge should find) go through tome's
core down to ``k - 1``; the ``R`` newlines, which mark rows that no longer exist after merging,
become one newline token, last, of size ``R`` (they are identical: their mean is the newline
itself, so this is an exact merge, and with proportional attention it draws the attention the
``R`` newlines together drew). The newline is never averaged with a visual token: it is not a
picture of anything, and the model saw it, in training, only as the end of a row.

An image keeps all its tokens (bit for bit) when ``k >= n``; else it gets ``min(V, k - 1) + 1``
tokens (``k`` in practice, where ``V >= k - 1``; at least 2: a visual token and the newline).

>>> import torch
>>> newline = torch.full((4,), 9.0)
>>> rows = [torch.cat([torch.randn(3, 4), newline[None]]) for _ in range(2)]  # 2 rows of 3 + newline
>>> image = torch.cat([torch.randn(4, 4), *rows])  # base (4 tokens), then the crops: n = 12
>>> merged, sources = reduce_packed([image], newline, visual_tokens=5, visual_ratio=None)
>>> merged[0].shape, torch.equal(merged[0][-1], newline)  # 4 visual tokens, then the newline
(torch.Size([5, 4]), True)
>>> torch.bincount(sources[0]).tolist()[-1]  # the newline holds the 2 newlines
2
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tome.adapters.common.vlm import kept_tokens, reduce_features

__all__ = ["newline_mask", "reduce_packed"]


def newline_mask(features: torch.Tensor, newline: torch.Tensor | None) -> torch.Tensor:
    """``(n,)`` bool: which of an image's packed features ``(n, D)`` are the ``newline`` vector.

    The model writes the parameter itself (cast to the features' dtype) after each row, so an
    exact comparison finds them; a projected visual token equal to it in every one of ``D``
    coordinates does not happen. ``None`` (no newline): all ``False``.

    >>> newline_mask(torch.tensor([[1.0, 2.0], [0.5, 0.5], [1.0, 2.0]]), torch.tensor([1.0, 2.0])).tolist()
    [True, False, True]
    """
    if newline is None:
        return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    return (features == newline.to(features.device, features.dtype)).all(-1)


def reduce_packed(
    features: Sequence[torch.Tensor],
    newline: torch.Tensor | None,
    visual_tokens: int | None,
    visual_ratio: float | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each image's packed features ``(n_i, D)`` merged (see the module docstring), and each
    image's source map: ``(n_i,)`` int64, the merged token that holds each original token (the
    newlines: the last one; the identity for an image left as it was), as
    :func:`~tome.adapters.common.vlm.reduce_images_tracked` gives it, for
    :func:`~tome.adapters.common.vlm.size_bias`.

    Images with the same numbers of visual tokens and of tokens to keep are merged as one batch
    (one loop step per distinct pair, never per token); each image's result depends on that
    image alone, so a batch's rows stay independent whatever the other images' sizes.
    """
    out: list[torch.Tensor] = list(features)
    sources = [torch.arange(image.shape[0], device=image.device) for image in features]
    plans: dict[tuple[int, int], list[tuple[int, torch.Tensor, int]]] = {}
    for index, image in enumerate(features):
        n = image.shape[0]
        k = kept_tokens(n, visual_tokens, visual_ratio)
        if k >= n:
            continue  # nothing merges: the image as it was, newlines and all
        is_newline = newline_mask(image, newline)
        rows = int(is_newline.sum())  # one host sync per image, not per token
        visual = n - rows
        if visual == 0:
            continue  # not an image the model packs: left alone
        keep = max(1, min(visual, k - 1 if rows else k))
        plans.setdefault((visual, keep), []).append((index, is_newline, rows))
    for (visual, keep), members in plans.items():
        stacked = torch.stack([features[i][~mask] for i, mask, _ in members])
        if keep < visual:
            merged, history = reduce_features(stacked, keep)
            held = history.source
        else:  # only the newlines merge
            merged = stacked
            held = torch.arange(visual, device=stacked.device).expand(len(members), visual)
        for row, (index, mask, rows) in enumerate(members):
            image = features[index]
            # the newlines (if any) all go to the one newline token, after the visual ones
            source = torch.full((image.shape[0],), keep, dtype=torch.long, device=image.device)
            source[~mask] = held[row].to(torch.long)
            out[index] = torch.cat([merged[row], image[mask][-1:]]) if rows else merged[row]
            sources[index] = source
    return out, sources
