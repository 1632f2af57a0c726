"""diffusers DiTs (PixArt-alpha/sigma, DiT, SD3 / SD3.5, Flux): merge -> op -> unmerge, as tomesd.

A DiT is one global token sequence: the ``h x w`` patches of the latent (``patch_size`` 2 for
PixArt, DiT and SD3; Flux's packed 2 x 2 latents), the same length in every block. Each block
gets and returns full-length tokens, exactly as in the UNets (:mod:`tome.adapters.diffusers_unet`):
its ops run on merged image tokens and their outputs are unmerged before the residual (the
handle and the forwards are shared with the UNets: :mod:`tome.adapters.common.diffusion`), with
tomesd's matching (one destination per ``sy x sx`` cell of the patch grid, the block's input as
the similarity) and tomesd's options and meanings (``max_downsample`` does not apply: a DiT
has one resolution).

What runs on merged tokens, per block type (``merge_attn`` / ``merge_crossattn`` /
``merge_mlp``):

- ``BasicTransformerBlock`` (PixArt, DiT): self-attention / cross-attention / feed-forward.
  Positions are added once, before the blocks (2-D sincos), so a merged token carries the
  mean of its members' positions in its features.
- ``JointTransformerBlock`` (SD3's MMDiT): the joint attention (and SD3.5's second
  self-attention) / - / the image feed-forward. Only image tokens merge: the text tokens are
  never touched, and they attend to the merged image tokens.
- ``FluxTransformerBlock`` (double stream): as SD3.
- ``FluxSingleTransformerBlock``: the joint sequence is text + image tokens; its image part
  merges, the text part stays as it is (:func:`tome.core.merge2d.keep_prefix`). ``merge_attn``: the
  attention; ``merge_mlp``: the MLP input projection and the output projection (which mixes
  the attention and MLP branches).

Flux applies rotary positions (RoPE) inside attention, to queries and keys. A merged image
token takes the rotary position of its destination (the token it was merged into: a real
position of one of its members, the one that stays in the grid). Merges differ per sample, so
these positions are per sample; diffusers' attention takes one table for the batch. So while a
merged attention runs, tome gives diffusers no table and rotates the queries and keys itself,
right after Flux's q/k norms (the op just before diffusers rotates them), with the same
formula (tested equal to diffusers' ``apply_rotary_emb``). The text tokens keep their own
positions.

Flux's transformer gets the patch grid from ``img_ids`` (row, column per token): it is read on
the host once per ``img_ids`` tensor (a pipeline passes the same one every step) and checked
to be one row-major grid; other layouts (Kontext's reference image tokens) do not merge, with
a warning.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
import torch.nn as nn

from tome.adapters.common.diffusion import (
    BLOCKS,
    DenoiserCall,
    DiffusionHandle,
    class_block_forward,
    class_op_forward,
    diffusers_class,
    run_block,
    run_denoiser,
    transformer_blocks,
)
from tome.core import merge as M
from tome.runtime.registry import MERGE_OP_UNMERGE, Adapter

__all__ = ["BLOCKS", "MODELS", "apply", "rotate"]

# model class -> (positional index of ``timestep`` in its forward, how it gives its grid)
MODELS = {
    "PixArtTransformer2DModel": (2, "patches"),
    "DiTTransformer2DModel": (1, "patches"),
    "SD3Transformer2DModel": (3, "patches"),
    "FluxTransformer2DModel": (3, "img_ids"),
}
_ATTENTION_ARGS = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on ``x`` ``(B, S, heads, D)``, as diffusers' ``apply_rotary_emb``
    (``use_real=True``, interleaved pairs, ``sequence_dim=1``), with a table per sample:
    ``cos``, ``sin`` ``(B, S, D)`` or ``(S, D)``."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None].to(x.device), sin[:, :, None].to(x.device)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _img_ids_grid(handle: DiffusionHandle, ids: torch.Tensor, tokens: int) -> tuple[int, int] | None:
    """The ``(h, w)`` grid of Flux's ``img_ids`` ``(S, 3)`` if they are one row-major grid of
    ``tokens`` positions, else ``None``; cached for the latest ``ids`` tensor (one host read
    per generation: a pipeline passes the same ids every step)."""
    cached = handle._grid_cache
    if cached is not None and cached[0]() is ids:
        return cached[1]
    grid = None
    if ids.dim() == 2 and ids.shape == (tokens, 3) and tokens > 0:
        rows, cols = ids[:, 1].long(), ids[:, 2].long()
        h, w = int(rows.max()) + 1, int(cols.max()) + 1
        expected = torch.arange(tokens, device=ids.device)
        if (
            h * w == tokens
            and torch.equal(rows * w + cols, expected)
            and bool((ids[:, 0] == ids[0, 0]).all())
        ):
            grid = (h, w)
    if grid is None:
        warnings.warn(
            "tome: this Flux call's img_ids are not one row-major grid of its image tokens "
            "(e.g. reference-image tokens); it does not merge",
            stacklevel=4,
        )
    with contextlib.suppress(TypeError):  # a tensor that takes no weak references: no cache
        handle._grid_cache = (weakref.ref(ids), grid)
    return grid


# -- installed forwards (module-level: patched models pickle and deep-copy) ----------------------


def _dit_forward(model: nn.Module, timestep_at: int, source: str, handle: DiffusionHandle, *args, **kwargs):
    hidden = args[0] if args else kwargs["hidden_states"]
    timestep = args[timestep_at] if len(args) > timestep_at else kwargs.get("timestep")
    grid: tuple[int, int] | None
    if source == "patches":  # (B, C, H, W) latents, cut into patch_size x patch_size patches
        size = model.config.patch_size
        grid = (hidden.shape[-2] // size, hidden.shape[-1] // size)
    else:  # Flux: packed tokens (B, S, C) and their (S, 3) positions
        ids = args[4] if len(args) > 4 else kwargs.get("img_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 3:
            ids = ids[0]
        grid = None
        if isinstance(ids, torch.Tensor) and handle.ratio > 0:
            if torch.compiler.is_compiling():
                h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
                grid = (h, w) if h * w == hidden.shape[1] else None
            else:
                grid = _img_ids_grid(handle, ids, hidden.shape[1])
    call = None if grid is None else DenoiserCall(grid[0], grid[1], timestep)
    return run_denoiser(model, handle, call, args, kwargs)


def _class_single_block_forward(
    block: nn.Module, forward, index: int, handle: DiffusionHandle, *args, **kwargs
):
    # Flux's single-stream block gets the image tokens and the text tokens apart and joins them
    # (text first): its ops see text + image, of which the plan merges the image part only.
    names = ("hidden_states", "encoder_hidden_states")
    text_states = args[1] if len(args) > 1 else kwargs.get(names[1])
    text = text_states.shape[1] if isinstance(text_states, torch.Tensor) else 0
    return run_block(block, index, handle, text, args, kwargs, forward)


def _single_block_forward(block: nn.Module, index: int, handle: DiffusionHandle, *args, **kwargs):
    # as installed before _class_single_block_forward: models patched then still load and run
    return _class_single_block_forward(block, None, index, handle, *args, **kwargs)


def _rope_attention_forward(module: nn.Module, handle: DiffusionHandle, *args, **kwargs):
    """Flux's attention on merged image tokens, with the merged tokens' rotary positions
    (their destinations'), per sample: applied by :func:`_rope_norm_forward`."""
    slot = handle.slot()
    current = slot.block
    call = dict(zip(_ATTENTION_ARGS, args, strict=False)) | kwargs
    hidden = call.get("hidden_states")
    if (
        current is None
        or not handle.merge_attn
        or not isinstance(hidden, torch.Tensor)
        or hidden.dim() != 3
        or tuple(hidden.shape[:2]) != (current.batch, current.tokens)
        or call.get("attention_mask") is not None
    ):
        return type(module).forward(module, *args, **kwargs)
    plan = current.plan
    rotary = call.pop("image_rotary_emb", None)
    rope = None
    if rotary is not None:
        cos, sin = rotary
        context = call.get("encoder_hidden_states")
        if isinstance(context, torch.Tensor):  # double stream: image queries; text apart
            text = context.shape[1]
            kept = plan.kept + text
            rope = (cos[kept], sin[kept], cos[:text], sin[:text])
        else:  # single stream: the joint sequence; the plan keeps the text tokens in front
            rope = (cos[plan.kept], sin[plan.kept], None, None)
    with handle.merge_step_part(hidden):
        call["hidden_states"] = M.merge(plan, hidden, "mean")
    previous = slot.rope
    slot.rope = rope
    try:
        out = type(module).forward(module, **call)
    finally:
        slot.rope = previous
    if isinstance(out, tuple):
        return (M.unmerge(plan.index, out[0]), *out[1:])
    return M.unmerge(plan.index, out)


def _rope_norm_forward(module: nn.Module, part: int, handle: DiffusionHandle, *args, **kwargs):
    # A q/k norm of Flux's attention: during a merged attention, rotate its output (part 0: the
    # image (or joint) queries/keys, part 2: the text ones of the double-stream block).
    out = type(module).forward(module, *args, **kwargs)
    rope = handle.slot().rope
    if rope is None or rope[part] is None:
        return out
    return rotate(out, rope[part], rope[part + 1])


# -- patching ---------------------------------------------------------------------------------------


def apply(model: nn.Module, **options) -> DiffusionHandle:
    # tome.patch checked and routed the options: r and the token models' settings are refused there
    spec = MODELS[diffusers_class(model, MODELS)]
    blocks = transformer_blocks(model)
    if not blocks:
        raise TypeError(f"model: this {type(model).__name__} has no transformer block; nothing to merge")
    handle = DiffusionHandle([name for name, _, _ in blocks], **options)  # checks every option
    with handle.installing():
        handle.install_method(model, "forward", _dit_forward, *spec, handle)
        for index, (_, block, kind) in enumerate(blocks):
            # the classes' own forwards bound now: Dynamo cannot look them up on diffusers' blocks
            forward = (
                _class_single_block_forward if kind == "FluxSingleTransformerBlock" else class_block_forward
            )
            handle.install_method(block, "forward", forward, type(block).forward, index, handle)
            for op, flag in BLOCKS[kind]:
                module = getattr(block, op, None)
                if not isinstance(module, nn.Module):
                    continue
                if flag != "rope":
                    handle.install_method(
                        module, "forward", class_op_forward, type(module).forward, flag, handle
                    )
                    continue
                handle.install_method(module, "forward", _rope_attention_forward, handle)
                for norm, part in (("norm_q", 0), ("norm_k", 0), ("norm_added_q", 2), ("norm_added_k", 2)):
                    target = getattr(module, norm, None)
                    if isinstance(target, nn.Module):
                        handle.install_method(target, "forward", _rope_norm_forward, part, handle)
    return handle


ADAPTER = Adapter(
    patches=(
        "diffusers.PixArtTransformer2DModel",
        "diffusers.DiTTransformer2DModel",
        "diffusers.SD3Transformer2DModel",
        "diffusers.FluxTransformer2DModel",
    ),
    apply=apply,
    kind=MERGE_OP_UNMERGE,
    handle=DiffusionHandle,
    title="diffusion models (a diffusers UNet2DConditionModel, PixArt / DiT / SD3 / Flux transformer, or DiffusionPipeline)",
    merged="image tokens before attention (and optionally cross-attention, MLP), unmerged after; text tokens "
    "never; Flux: merged tokens rotate at their destination's position",
    tested_on="tiny random PixArt, DiT, SD3 (with SD3.5's dual attention), Flux; a PixArt-alpha pipeline",
    schedule=("ratio",),
)
