"""Which input sizes a ViT accepts, read from the model itself (not from its pretraining size).

- timm ``VisionTransformer``: built with ``dynamic_img_size=True`` it resamples its position
  embeddings for any multiple of the patch size; otherwise it takes ``patch_embed.img_size`` only.
- torchvision ``VisionTransformer``: ``image_size`` only (its forward checks it).
- transformers DINOv2 (with registers) interpolates its position embeddings in every forward:
  any multiple of the patch size (``config.image_size`` is only the pretraining size). ViT and
  CLIP vision take ``config.image_size`` unless called with ``interpolate_pos_encoding=True``,
  which the tools do not do: ``config.image_size`` only.

>>> InputSizes(multiple=14, why="DINOv2").describe()
'any multiple of 14 pixels per side (e.g. 224x224 or 518x518; DINOv2)'
>>> InputSizes(fixed=(64, 64)).accepts(64, 64), InputSizes(fixed=(64, 64)).accepts(32, 32)
(True, False)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

__all__ = ["InputSizes", "input_sizes"]


@dataclass(frozen=True)
class InputSizes:
    """The input sizes a model accepts: exactly ``fixed`` (height, width), or any multiple of
    ``multiple`` pixels per side. ``why`` says where that comes from (for messages)."""

    fixed: tuple[int, int] | None = None
    multiple: int | None = None
    why: str = ""

    def accepts(self, height: int, width: int) -> bool:
        if self.fixed is not None:
            return (height, width) == self.fixed
        step = self.multiple or 1
        return height >= step and width >= step and height % step == 0 and width % step == 0

    def describe(self) -> str:
        """E.g. ``"64x64 pixels only (...)"`` or ``"any multiple of 14 pixels per side (...)"``."""
        why = f"; {self.why}" if self.why else ""
        if self.fixed is not None:
            return f"{self.fixed[0]}x{self.fixed[1]} pixels only" + (f" ({self.why})" if self.why else "")
        step = self.multiple or 1
        examples = sorted({step * k for k in (224 // step, 518 // step) if k > 0})
        shown = " or ".join(f"{s}x{s}" for s in examples)
        return f"any multiple of {step} pixels per side (e.g. {shown}{why})"


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int | float):
        return int(value), int(value)
    height, width = value
    return int(height), int(width)


def input_sizes(module: nn.Module, family: str) -> InputSizes:
    """The sizes ``module`` (of ``family``: ``"timm"``, ``"transformers"`` or ``"torchvision"``)
    accepts in a plain forward."""
    if family == "timm":
        patch = int(module.patch_embed.patch_size[0])
        if getattr(module, "dynamic_img_size", False):
            return InputSizes(multiple=patch, why="timm, built with dynamic_img_size=True")
        fixed = _pair(module.patch_embed.img_size)
        return InputSizes(
            fixed=fixed,
            why=f"timm, built with img_size={fixed[0]}; build it with dynamic_img_size=True for other sizes",
        )
    if family == "torchvision":
        size = int(module.image_size)
        return InputSizes(
            fixed=(size, size), why=f"torchvision, built with image_size={size}, which its forward checks"
        )
    config = getattr(module.config, "vision_config", module.config)
    if str(getattr(config, "model_type", "")).startswith("dinov2"):
        return InputSizes(multiple=int(config.patch_size), why="DINOv2 interpolates its position embeddings")
    fixed = _pair(config.image_size)
    return InputSizes(
        fixed=fixed,
        why=f"config.image_size of {type(module).__name__}; other sizes need interpolate_pos_encoding=True",
    )
