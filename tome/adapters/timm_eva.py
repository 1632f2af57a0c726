"""timm ``Eva`` (EVA-02, EVA-CLIP, Perception Encoder, DINOv3, timm's ``vit_*_rope*``): merge
between attention and MLP in every ``EvaBlock`` / ``EvaBlockPostNorm``, with rotary positions
carried to the merged tokens.

Each block is re-composed from its own submodules (norms, attention, ``gamma_1``/``gamma_2``
LayerScale, drop-path, MLP), as :mod:`tome.adapters.timm_vit` does for ``VisionTransformer``: the
attention module keeps its own fused/unfused path and rotary code; proportional attention goes
in as its float ``attn_mask``. Keys (the matching metric) are read from ``attn.k_norm`` (before
the rotation: the similarity of the content, not of the positions) by a forward hook.

Rotary positions. RoPE rotates each query and key by its token's position, so attention logits
depend on relative positions. A merged token holds several positions; the model's ``rope``
tensor (``sin | cos`` per patch, given to every block) is replaced, for the merged tokens, by
the size-weighted mean of its original patches' ``sin`` and ``cos`` (``rope_merge="mean"``,
the default). Rotations act linearly on ``q`` and ``k``, so a merged key with this embedding
gives every query the size-weighted *mean of the logits* its original keys would have had
for the same content (and a merged query likewise): it is the rotary counterpart of ToMe's
averaging of the tokens themselves. Where a group's angles disagree (high frequencies over
distant patches) the averaged rotation shrinks, and that frequency stops pretending to a
position the group does not have. Alternatives, settable as ``model.tome.rope_merge``:
``"normalized"`` (the same mean, rescaled to unit length per frequency: the circular mean of
the angles) and ``"first"`` (the position of the group's first original patch).
``benchmarks/rope_merge.py`` measures them against plain averaging of the positions.

Every installed function is module-level and gets its block index and the handle as bound
arguments, so a patched model pickles and deep-copies. The handle and :func:`merged_rope` are in
:mod:`tome.adapters.common.rope`, the blocks and hooks in :mod:`tome.adapters.common.timm_blocks`
(shared with :mod:`tome.adapters.timm_naflex`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tome.adapters.common.rope import ROPE_MERGES, RopeHandle, block_rope, merged_rope
from tome.adapters.common.timm import VISION
from tome.adapters.common.timm_blocks import (
    begin_block,
    check_eva_block,
    forward_features,
    forward_intermediates,
    install,
    pool,
    run_eva_block,
)
from tome.runtime.handle import ToMeHandle
from tome.runtime.registry import Adapter

# The rotary pieces live in tome.adapters.common.rope (timm_naflex uses them too); named here as
# well, where the module docstring describes them.
__all__ = ["ADAPTER", "ROPE_MERGES", "RopeHandle", "apply", "merged_rope"]


def _block_forward(
    block: nn.Module,
    index: int,
    handle: ToMeHandle,
    kind: str,
    x: torch.Tensor,
    rope: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    call, bias = begin_block(handle, index, x, attn_mask, is_causal, "timm Eva")
    return run_eva_block(block, kind, handle, call, x, block_rope(handle, call, rope), bias, is_causal)


def apply(model: nn.Module, *, r, **settings) -> ToMeHandle:
    blocks = list(model.blocks)
    kinds = [check_eva_block(i, block, model.num_prefix_tokens) for i, block in enumerate(blocks)]
    if not hasattr(type(model), "pool"):
        raise TypeError("tome: this timm version's Eva has no pool(); please upgrade timm")
    handle = RopeHandle(len(blocks), r, protected=model.num_prefix_tokens, **settings)
    methods = {
        "forward_features": forward_features,
        "pool": pool,
        "forward_intermediates": forward_intermediates,
    }
    install(handle, model, blocks, [(_block_forward, kind) for kind in kinds], methods)
    return handle


ADAPTER = Adapter(
    patches=("timm.Eva",),
    apply=apply,
    handle=RopeHandle,
    title="timm vision transformers with rotary positions (Eva, NaFlexVit)",
    merged="between attention and MLP in every `EvaBlock` / `EvaBlockPostNorm`; merged tokens rotate (RoPE) by "
    "the size-weighted mean of their patches' sin/cos; pooling size-weighted",
    tested_on="tiny random configs (EVA-02, vit_*_rope*, mixed RoPE, DINOv3 with registers, PE attention "
    "pooling, post-norm)",
    vision=VISION,
)
