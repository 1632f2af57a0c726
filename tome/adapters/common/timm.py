"""What the tools need to know of a timm ``VisionTransformer`` or ``Eva`` (the adapters
:mod:`tome.adapters.timm_vit` and :mod:`tome.adapters.timm_eva` publish it as their
:class:`~tome.runtime.registry.VisionInfo`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.runtime.registry import InputSizes, VisionInfo, pair

__all__ = ["VISION", "input_sizes"]


def tokens(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = model.forward_features(pixels)
    return x, model.forward_head(x) if model.num_classes else None


def pool(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model.forward_head(tokens, pre_logits=True)


def input_sizes(model: nn.Module) -> InputSizes:
    """Built with ``dynamic_img_size=True``, a timm ViT resamples its position embeddings for any
    multiple of the patch size; otherwise it takes ``patch_embed.img_size`` only."""
    patch = int(model.patch_embed.patch_size[0])
    if getattr(model, "dynamic_img_size", False):
        return InputSizes(multiple=patch, why="timm, built with dynamic_img_size=True")
    fixed = pair(model.patch_embed.img_size)
    return InputSizes(
        fixed=fixed,
        why=f"timm, built with img_size={fixed[0]}; build it with dynamic_img_size=True for other sizes",
    )


VISION = VisionInfo(
    tokens=tokens,
    pool=pool,
    run=lambda model, pixels: model(pixels),
    blocks=lambda model: list(model.blocks),
    width=lambda model: int(model.embed_dim),
    default_size=lambda model: int(model.patch_embed.img_size[0]),
    patch_size=lambda model: int(model.patch_embed.patch_size[0]),
    protected=lambda model: int(model.num_prefix_tokens),
    num_classes=lambda model: int(model.num_classes),
    input_sizes=input_sizes,
)
