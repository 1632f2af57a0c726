"""Which input sizes a ViT accepts, read from the model itself (not from its pretraining size).

Each family says it in its adapter (:class:`~tome.runtime.registry.VisionInfo.input_sizes`):

- timm ``VisionTransformer``: built with ``dynamic_img_size=True`` it resamples its position
  embeddings for any multiple of the patch size; otherwise it takes ``patch_embed.img_size`` only.
- torchvision ``VisionTransformer``: ``image_size`` only (its forward checks it).
- transformers DINOv2 (with registers) interpolates its position embeddings in every forward:
  any multiple of the patch size (``config.image_size`` is only the pretraining size). ViT and
  CLIP vision take ``config.image_size`` unless called with ``interpolate_pos_encoding=True``,
  which the tools do not do: ``config.image_size`` only.

>>> InputSizes(multiple=14, why="DINOv2").describe()
'any multiple of 14 pixels per side (e.g. 224x224 or 518x518; DINOv2)'
"""

from __future__ import annotations

import torch.nn as nn

from tome.runtime.registry import InputSizes, adapter_for

__all__ = ["InputSizes", "input_sizes"]


def input_sizes(module: nn.Module) -> InputSizes:
    """The sizes ``module`` (a model the tools run) accepts in a plain forward."""
    adapter = adapter_for(module)
    if adapter is None or adapter.vision is None:
        raise TypeError(f"input_sizes: the tools do not run {type(module).__qualname__}")
    return adapter.vision.input_sizes(module)
