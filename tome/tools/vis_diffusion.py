"""Pictures of what a patched diffusion model merges: the merge groups of one block on the
latent grid, drawn with the same panels and colours as for ViTs (:mod:`tome.tools.vis`).

>>> import torch, diffusers, tome
>>> torch.manual_seed(0) and None
>>> model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8,
...     in_channels=4, out_channels=8, num_layers=1, cross_attention_dim=16, sample_size=8,
...     caption_channels=12, norm_num_groups=4)
>>> inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 3, 12),
...     "timestep": torch.tensor([500, 500]), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
>>> source, grid = merge_groups(tome.patch(model, ratio=0.5), inputs, block=0)
>>> source.shape, grid, int(source.max()) < 16
(torch.Size([2, 16]), (4, 4), True)
>>> panels = merge_panels(torch.rand(2, 3, 32, 32), source, grid, patch=8)
>>> panels.num_groups
[8, 8]
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.tools.vis import Panels, merge_panels

__all__ = ["diffusion_panels", "merge_groups", "merge_panels"]

_OPS = ("attn1", "attn", "ff", "attn2", "proj_mlp")


def merge_groups(
    model: nn.Module, inputs: dict, block: int = 0
) -> tuple[torch.Tensor | None, tuple[int, int]]:
    """Run the patched denoiser ``model`` (``tome.patch``-ed UNet or DiT) once on ``inputs``
    (its forward's keywords) and return what block ``block`` (an index into
    ``model.tome.blocks``) merged: ``source`` ``(B, h * w)``, the group (merged position) of
    every image token of the block's ``h x w`` grid, and the grid; ``source`` is ``None`` when
    that block merged nothing (a UNet block below ``max_downsample``, ``ratio`` 0)."""
    handle = model.tome
    name = handle.blocks[block]
    target = model.get_submodule(name)
    seen: dict = {}

    def look(module, args, output):
        if "plan" in seen:
            return
        current, call = handle.slot().block, handle.slot().unet
        if current is not None and call is not None:
            seen["plan"], seen["call"] = current, call

    hooks = [
        getattr(target, op).register_forward_hook(look)
        for op in _OPS
        if isinstance(getattr(target, op, None), nn.Module)
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    if "plan" not in seen:
        return None, (0, 0)
    current, call = seen["plan"], seen["call"]
    index = current.plan.index[:, current.text :] - current.text  # image tokens only
    tokens = index.shape[1]
    # the block's grid: the call's full-resolution grid, downsampled as tomesd computes it
    scale = max(1, round((call.height * call.width / tokens) ** 0.5))
    h = -(-call.height // scale)
    return index, (h, tokens // h)


def diffusion_panels(
    model: nn.Module, inputs: dict, image: torch.Tensor, block: int = 0, *, average: str = "color"
) -> Panels:
    """The three panels (original, groups, mean colour per group) of block ``block``'s merges,
    drawn over ``image`` ``(B, 3, H, W)`` in [0, 1] (e.g. the decoded latents, or the
    picture an image-to-image run starts from), resized to the block's grid."""
    source, (h, w) = merge_groups(model, inputs, block)
    if source is None:
        raise ValueError(f"block: block {block} ({model.tome.blocks[block]}) merged nothing in this call")
    patch = max(1, min(image.shape[-2] // h, image.shape[-1] // w))
    unit = torch.nn.functional.interpolate(image.float(), size=(h * patch, w * patch), mode="bilinear")
    return merge_panels(unit.clamp(0, 1), source, (h, w), patch, average=average)
