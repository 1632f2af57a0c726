"""The per-process side of test_ddp (spawned processes import it by name)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def build_model() -> nn.Module:
    """The same patched tiny timm ViT in every process (same seed)."""
    import timm

    import tome

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
        num_classes=5, drop_path_rate=0.0,
    )  # fmt: skip
    return tome.patch(model.train(), r=3)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 5, (4,), generator=generator)


def run(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(build_model())
        images, labels = batch()
        share = len(images) // world
        mine = slice(rank * share, (rank + 1) * share)
        loss = nn.functional.cross_entropy(model(images[mine]), labels[mine])
        loss.backward()  # DDP averages the gradients of the processes
        counts = model.module.tome.tokens_per_layer
        if rank == 0:
            grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
            torch.save({"grads": grads, "tokens": counts}, out_file)
    finally:
        dist.destroy_process_group()
