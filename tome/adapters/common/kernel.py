"""The handle of the families whose attention tome runs itself (timm ``VisionTransformer``,
torchvision ``VisionTransformer``, open_clip's image tower): :class:`~tome.runtime.handle.ToMeHandle`
plus the kernel that runs proportional attention (:mod:`tome.core.attention`).

>>> handle = KernelHandle(2, 1, protected=1, attention_kernel="flex")
>>> kernel_of(handle, user_mask=None), kernel_of(handle, user_mask=torch.zeros(1, 1, 3, 3))
('flex', 'sdpa')
"""

from __future__ import annotations

import torch

from tome.core.attention import KERNELS
from tome.runtime.handle import ToMeHandle
from tome.runtime.options import Option, one_of

__all__ = ["KernelHandle", "is_key_bias", "kernel_of"]


class KernelHandle(ToMeHandle):
    """:class:`ToMeHandle` with the ``attention_kernel`` option (a ``tome.patch`` keyword,
    settable here)."""

    attention_kernel = Option(
        "sdpa",
        one_of(*KERNELS),
        "the kernel of proportional attention: sdpa (a float mask) or flex (FlexAttention, log "
        "size added by a score_mod: fused on CUDA, compiled on first use)",
    )


def kernel_of(handle: ToMeHandle, user_mask: object) -> str:
    """The kernel of one block call: ``"sdpa"`` when the caller gave a mask of its own
    (``user_mask`` not ``None``: it runs through the family's own route, as it is), else the
    handle's ``attention_kernel`` (``"sdpa"`` for a model patched and pickled before the option
    existed, whose handle is a plain :class:`ToMeHandle`)."""
    if user_mask is not None:
        return "sdpa"
    return getattr(handle, "attention_kernel", "sdpa")


def is_key_bias(mask: torch.Tensor | None) -> bool:
    """Whether ``mask`` is a per-key mask ``(B, 1, 1, N)`` (proportional attention, padding), the
    form :func:`tome.core.attention.key_bias_attention` takes as ``mask[:, 0, 0, :]``."""
    return mask is not None and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1
