"""A transformers DINOv2 checkpoint as timm's ``vit_small_patch14_dinov2`` (the same real model in
both libraries: the speed suite times one against the other, and the tests check the two give the
same outputs). The key mapping of legacy (transformers 4) and current (transformers 5) names.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["hf_dinov2_to_timm", "timm_dinov2_from_hf"]

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
