"""Fidelity measures for text embeddings: cosine to a reference, Spearman's rank correlation.

Pure functions on tensors and lists; no scipy needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["average_ranks", "cosine_stats", "pair_cosines", "spearman"]


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values``; tied values all get the mean of the ranks they span (as
    ``scipy.stats.rankdata(method="average")``).

    >>> average_ranks([10, 20, 20, 5])
    [2.0, 3.5, 3.5, 1.0]
    """
    values = [float(v) for v in values]
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        rank = (start + end) / 2 + 1  # ranks start+1 .. end+1, averaged
        for k in range(start, end + 1):
            ranks[order[k]] = rank
        start = end + 1
    return ranks


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    n = len(a)
    mean_a, mean_b = sum(a) / n, sum(b) / n
    da = [x - mean_a for x in a]
    db = [y - mean_b for y in b]
    denominator = math.sqrt(sum(x * x for x in da) * sum(y * y for y in db))
    if denominator == 0:
        return math.nan
    return sum(x * y for x, y in zip(da, db, strict=True)) / denominator


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho of two equally long sequences: the Pearson correlation of their average
    ranks (ties share their mean rank). NaN when fewer than 2 values or one side is constant.

    >>> round(spearman([1, 2, 2, 3], [1, 3, 2, 4]), 6)  # sqrt(0.9)
    0.948683
    >>> spearman([1, 2, 3], [3, 2, 1])
    -1.0
    """
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} and {len(b)} values; expected equally many")
    if len(a) < 2:
        return math.nan
    return _pearson(average_ranks(a), average_ranks(b))


def cosine_stats(embeddings: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(mean, min)`` over rows of the cosine similarity of ``embeddings`` to ``reference``
    (both ``(n, D)``, computed in float64).

    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> cosine_stats(x, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    (0.8535533905932737, 0.7071067811865475)
    """
    if embeddings.shape != reference.shape:
        raise ValueError(
            f"cosine_stats: shapes {tuple(embeddings.shape)} and {tuple(reference.shape)} differ"
        )
    cos = F.cosine_similarity(embeddings.double(), reference.double(), dim=-1)
    return cos.mean().item(), cos.min().item()


def pair_cosines(first: torch.Tensor, second: torch.Tensor) -> list[float]:
    """Cosine similarity of row i of ``first`` with row i of ``second`` (a sentence pair's
    predicted similarity)."""
    return F.cosine_similarity(first.double(), second.double(), dim=-1).tolist()
