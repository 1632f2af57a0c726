"""diffusers ``UNet2DConditionModel`` (SD 1.x / 2.x, SDXL): merge -> op -> unmerge, as tomesd.

Every ``BasicTransformerBlock`` gets and returns full-length tokens: its self-attention (and,
with ``merge_crossattn`` / ``merge_mlp``, its cross-attention and feed-forward) runs on merged
tokens and its output is unmerged before the residual, so the UNet's convolutions and skips see
the shapes they expect. The matching is tomesd's (:mod:`tome.core.merge2d`): per block, on the block's
input tokens, one destination per ``sy x sx`` cell of the latent grid.

Nothing of the block is copied: the block's own ``forward`` runs unchanged, and the three ops
it calls (``attn1``, ``attn2``, ``ff``) are wrapped, each merging its input and unmerging its
output. The pieces of one call reach each other through a per-thread slot that holds something
only for the duration of that call: the UNet's call leaves the latent size (and its timestep,
for the random choice) for the blocks; a block's call leaves its merge plan for its ops. The
settings are never written during a forward pass, so several threads can run one patched UNet
at once; a block recomputed by gradient checkpointing merges exactly as it did the first time.
The handle (:class:`~tome.adapters.common.diffusion.DiffusionHandle`), tomesd's matching and the
block and op forwards are shared with the DiTs (:mod:`tome.adapters.common.diffusion`).

Randomness (``use_rand``, an even batch as tomesd requires): each block call picks its
destinations with a counter-based hash (:func:`tome.core.merge2d.hashed_offsets`) of
``block_key(seed, timestep, block)``, computed on the timestep's device: no generator, no
device-to-host copy (the timestep is never read on the host, so no sync per call and no graph
break under ``torch.compile``). The global RNG is never read or advanced, so patching does not
change the user's sampling, and the same call always merges the same way (threads, gradient
checkpointing's recomputation). tomesd instead forks the global RNG once per model and advances
its own generator call after call.
"""

from __future__ import annotations

import warnings

import torch.nn as nn

from tome.adapters.common.diffusion import (
    DEFAULTS,
    OPS,
    DenoiserCall,
    DiffusionHandle,
    block_key,
    class_block_forward,
    class_op_forward,
    diffusers_class,
    run_denoiser,
)
from tome.runtime.registry import MERGE_OP_UNMERGE, Adapter

# The handle and tomesd's defaults are shared with the DiTs (tome.adapters.common.diffusion);
# named here too, where the module docstring describes them.
__all__ = ["DEFAULTS", "DiffusionHandle", "apply", "block_key"]


# -- installed forwards (module-level: patched models pickle and deep-copy) ----------------------


def _unet_forward(unet: nn.Module, handle: DiffusionHandle, *args, **kwargs):
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    return run_denoiser(
        unet, handle, DenoiserCall(sample.shape[-2], sample.shape[-1], timestep), args, kwargs
    )


# -- patching ---------------------------------------------------------------------------------------


def _is_block(module: nn.Module) -> bool:
    return diffusers_class(module, ("BasicTransformerBlock",)) is not None


def _downsampling(name: str, levels: int) -> int | None:
    """The downsampling of a UNet block from its module name (for the patch-time check)."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return 2 ** int(parts[1])
    if parts[0] == "up_blocks":
        return 2 ** (levels - 1 - int(parts[1]))
    if parts[0] == "mid_block":
        return 2 ** (levels - 1)
    return None


def apply(model: nn.Module, **options) -> DiffusionHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    blocks = [(name, m) for name, m in model.named_modules() if _is_block(m)]
    if not blocks:
        raise TypeError(
            f"model: this {type(model).__name__} has no BasicTransformerBlock (no attention); "
            "there is nothing for tome to merge"
        )
    handle = DiffusionHandle([name for name, _ in blocks], **options)  # checks every option
    levels = len(getattr(model, "down_blocks", ())) or 1
    downsamplings = [_downsampling(name, levels) for name, _ in blocks]
    if handle.ratio > 0 and all(d is not None and d > handle.max_downsample for d in downsamplings):
        warnings.warn(
            f"tome: no attention block of this UNet runs at a downsampling <= max_downsample="
            f"{handle.max_downsample} (the finest is {min(downsamplings)}x, as in SDXL); nothing "
            f"will merge: pass max_downsample={min(downsamplings)} to merge it",
            stacklevel=4,
        )
    with handle.installing():
        handle.install_method(model, "forward", _unet_forward, handle)
        for index, (_, block) in enumerate(blocks):
            # the class's own forward bound now: Dynamo cannot look it up on diffusers' blocks
            handle.install_method(block, "forward", class_block_forward, type(block).forward, index, handle)
            for op, _ in OPS:
                module = getattr(block, op, None)
                if isinstance(module, nn.Module):
                    handle.install_method(
                        module, "forward", class_op_forward, type(module).forward, op, handle
                    )
    return handle


ADAPTER = Adapter(
    patches=("diffusers.UNet2DConditionModel",),
    apply=apply,
    kind=MERGE_OP_UNMERGE,
    handle=DiffusionHandle,
    title="diffusion models (a diffusers UNet2DConditionModel, PixArt / DiT / SD3 / Flux transformer, or DiffusionPipeline)",
    merged="before self-attention (and optionally cross-attention, MLP), unmerged after: full-length outputs",
    tested_on="tiny random UNets; tomesd as the reference",
    schedule=("ratio",),
)
