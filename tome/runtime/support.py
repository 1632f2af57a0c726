"""The support table: which model classes ``tome.patch`` takes, what it merges, how it is tested.

The classes come from the adapters' registry (``tome.patch._ADAPTERS``, the same list the error
of :func:`tome.patch` prints), so the table cannot go stale; this module adds one line per
adapter on what it merges and what the test suite runs it on. Print it with::

    python -m tome.runtime.support            # the markdown table of the README
"""

from __future__ import annotations

# adapter module -> (kind of adapter, what is merged, tested on)
_NOTES: dict[str, tuple[str, str, str]] = {
    "tome.adapters.timm_vit": (
        "carry",
        "between attention and MLP in every `Block`; avg/attention pooling size-weighted",
        "tiny random configs (ViT, DeiT, DINOv2, registers, qk-norm); real DINOv2-S/14",
    ),
    "tome.adapters.timm_eva": (
        "carry",
        "between attention and MLP in every `EvaBlock` / `EvaBlockPostNorm`; merged tokens rotate (RoPE) by the "
        "size-weighted mean of their patches' sin/cos; pooling size-weighted",
        "tiny random configs (EVA-02, vit_*_rope*, mixed RoPE, DINOv3 with registers, PE attention pooling, post-norm)",
    ),
    "tome.adapters.timm_naflex": (
        "masked",
        "between attention and MLP (ViT `Block` or RoPE `EvaBlock`); each image merges its own patches, padding "
        "changes none of them; pooling with `patch_valid` size-weighted",
        "tiny random configs (learned / RoPE / mixed-RoPE positions, registers, attention pooling, key-only mask)",
    ),
    "tome.adapters.transformers_vision": (
        "carry",
        "between attention and MLP in every layer; pooling heads size-weighted",
        "tiny random configs (ViT, DINOv2, CLIP, SigLIP/SigLIP2 with NaFlex padding, VideoMAE, AST, ViT-MAE, backbones); real DINOv2-S/14",
    ),
    "tome.adapters.transformers_text": (
        "masked",
        "between attention and feed-forward; each row merges its own real tokens, padding changes none of them",
        "tiny random configs; real all-MiniLM-L6-v2 (sentence-transformers)",
    ),
    "tome.adapters.transformers_modernbert": (
        "masked",
        "between attention and MLP; RoPE at each merged token's first original position, local windows by its originals' span",
        "tiny random configs",
    ),
    "tome.adapters.torchvision_vit": (
        "carry",
        "between attention and MLP in every `EncoderBlock`",
        "tiny random configs",
    ),
    "tome.adapters.open_clip": (
        "carry",
        "the image tower only (`encode_text` untouched); pooling size-weighted",
        "tiny random configs",
    ),
    "tome.adapters.diffusers_unet": (
        "merge → op → unmerge",
        "before self-attention (and optionally cross-attention, MLP), unmerged after: full-length outputs",
        "tiny random UNets; tomesd as the reference",
    ),
    "tome.adapters.diffusers_dit": (
        "merge → op → unmerge",
        "image tokens before attention (and optionally cross-attention, MLP), unmerged after; text tokens never; Flux: merged tokens rotate at their destination's position",
        "tiny random PixArt, DiT, SD3 (with SD3.5's dual attention), Flux; a PixArt-alpha pipeline",
    ),
}


def support_rows() -> list[tuple[str, str, str, str, str]]:
    """``(library, classes, kind, what is merged, tested on)`` per adapter, from the registry."""
    from tome.runtime.patching import _ADAPTERS

    rows = []
    for family, _, adapter, classes in _ADAPTERS:
        kind, merged, tested = _NOTES.get(adapter, ("", "", ""))
        rows.append((family, ", ".join(f"`{c}`" for c in classes), kind, merged, tested))
    return rows


def support_table() -> str:
    """The support table as markdown.

    >>> support_table().splitlines()[0]
    '| library | model classes | adapter | what is merged | tested on |'
    """
    lines = ["| library | model classes | adapter | what is merged | tested on |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in support_rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(support_table())
