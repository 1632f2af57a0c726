"""Helpers the per-family patch tests share."""

from __future__ import annotations

import torch.nn as nn

# Method names an adapter may shadow on a module instance (tome's installed methods).
_SHADOWED = {
    "forward",
    "forward_features",
    "forward_intermediates",
    "pool",
    "_pool",
    "__prepare_scriptable__",
}


def expected_counts(n: int, r: list[int], protected: int = 1) -> list[int]:
    """Token counts entering the first block, then after each block, for a per-block schedule
    ``r`` (each block merges at most half of its unprotected tokens)."""
    counts = [n]
    for value in r:
        n -= min(value, (n - protected) // 2)
        counts.append(n)
    return counts


def patched_state(model: nn.Module) -> list[str]:
    """Names of the modules that carry hooks or shadowed methods (``[]`` once unpatched)."""
    return [
        name
        for name, module in model.named_modules()
        if module._forward_hooks or module._forward_pre_hooks or _SHADOWED & set(module.__dict__)
    ]
