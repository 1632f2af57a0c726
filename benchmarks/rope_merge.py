"""Which rotary position should a merged token have? Measured against plain averaging of positions.

No RoPE model with trained weights can be had here (EVA-02, PE, DINOv3 checkpoints live on model
hubs), so the measure isolates what the rotary position of a merged token decides: a RoPE
attention head whose logits depend on positions alone, fed the merge groups and the token
features of a real model on real photos.

- Merge groups: the shared DINOv2-S/14 (real weights) at 196 px, a 14 x 14 patch grid (the grid
  of EVA-02-B/16 at 224 px), patched with ``tome.patch(model, r=R)``; its ``model.tome.source``
  after the last block gives each photo's groups (similar-looking patches, often far apart).
- Rotary embedding: timm's own, as ``eva02_base_patch16_clip_224`` builds it
  (``RotaryEmbeddingCat``: head_dim 64, 14 x 14 grid, ``ref_feat_shape`` 16 x 16, temperature 1e4).
- The head: queries and keys carry one content vector ``c`` per head (12 random heads) rotated by
  their token's position, so ``logit(i, j) = beta * <R_i c, R_j c> / |c|^2``: a kernel of the
  relative position, sharper as ``beta`` grows (``--betas``). Values: the unmerged DINOv2-S
  output tokens of the photo. A merged token keeps the content ``c`` (the mean of equal contents),
  its value is its group's mean, proportional attention adds log(size); only its rotary
  position differs between the methods:

  - ``positions``: plain averaging of the positions: the group's mean (y, x), rotated as a token
    there would be (the angles are affine in the grid position: averaging positions is averaging
    the angles, unwrapped);
  - ``mean`` (tome's default): the size-weighted mean of the group's sin and cos (unnormalised);
  - ``normalized``: that mean rescaled to unit length per frequency (circular mean of the angles);
  - ``first``: the position of the group's first patch (a representative token's).

Reported per method (mean over photos and heads): ``attn TV``, the total-variation distance
between each original query's attention mass over the merged groups (exact: summed over each
group's members) and the mass its merged token gives them; ``out err``, the relative error
||O_hat - O|| / ||O - mean(O)|| of every original token's attention output after unmerge;
``floor``: the same error for the group-mean of the exact outputs (the best any per-group
output can do). ``attends ~k patches``: the exact head's perplexity (exp of its attention
entropy), how wide the positional kernel is at that ``beta``. The method is chosen on the first half of the photos ("calibration") and
reported on the second ("held out").

``--student``: a RoPE model with trained weights, made here. A small Eva in EVA-02-Ti's layout
(6 blocks, SwiGLU, axial RoPE, *no* absolute position embedding, 112 px: 8 x 8 patches of 14 px)
is trained to reproduce the real DINOv2-S's CLS and patch features (cosine loss) on the first
half of the photos (9 views each: the photo and 8 random crops with flips; AdamW, one-cycle,
``--epochs``), then measured on the held-out half: the cosine of its CLS and (unmerged) patch
features to the unmerged student's, for each rotary method, after ``tome.patch(model, r)``. It
also prints how much the student leans on RoPE (the same weights with the rotations removed).

    python benchmarks/rope_merge.py              # ~2 min on 2 CPU cores (one thread)
    python benchmarks/rope_merge.py --limit 20 --r 8 16
    python benchmarks/rope_merge.py --student --r 4 6 8    # a RoPE Eva trained here (~5 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


import tome  # noqa: E402
from tome.adapters import timm_eva  # noqa: E402
from tome.core.merge import MergeHistory  # noqa: E402

SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "dinov2-small-saliency"
IMAGES = SHARED / "images" / "imagenet-samples"
GRID = 14
METHODS = ("positions", "mean", "normalized", "first")


def photos(limit: int, size: int = GRID * 14) -> torch.Tensor:
    from PIL import Image

    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    out = []
    for path in sorted(IMAGES.glob("*.JPEG"))[:limit]:
        image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
        out.append((pixels.permute(2, 0, 1).float() / 255 - mean) / std)
    return torch.stack(out)


def eva_rope() -> torch.Tensor:
    """The axial rotary embedding of EVA-02-B/16 (CLIP) at 224 px: (196, 128) = sin | cos."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    rope = RotaryEmbeddingCat(dim=64, in_pixels=False, feat_shape=(GRID, GRID), ref_feat_shape=(16, 16))
    return rope.get_embed().float()


def affine_angles(rope: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``theta(y, x) = t0 + a*y + b*x`` per channel, recovered from the embedding (valid when a
    step of the grid turns every frequency by less than pi; checked on the whole grid)."""
    sin, cos = rope.chunk(2, dim=-1)
    theta = torch.atan2(sin, cos).reshape(grid, grid, -1)
    wrap = lambda t: torch.remainder(t + torch.pi, 2 * torch.pi) - torch.pi  # noqa: E731
    t0, a, b = theta[0, 0], wrap(theta[1, 0] - theta[0, 0]), wrap(theta[0, 1] - theta[0, 0])
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    rebuilt = t0 + a * ys.reshape(-1, 1) + b * xs.reshape(-1, 1)
    error = (torch.cat([rebuilt.sin(), rebuilt.cos()], -1) - rope).abs().max().item()
    if error > 1e-4:
        raise RuntimeError(f"the rotary angles are not affine in the grid position (error {error:.1e})")
    return t0, a, b


def positions_rope(rope: torch.Tensor, history: MergeHistory, protected: int, grid: int) -> torch.Tensor:
    """Plain averaging of positions: each group rotated as a token at its mean (y, x)."""
    t0, a, b = affine_angles(rope, grid)
    source = history.source[:, protected:] - protected
    B, n0 = source.shape
    n = history.sizes.shape[1] - protected
    yx = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).reshape(-1, 2)
    total = torch.zeros(B, n, 2).scatter_add_(
        1, source[..., None].expand(B, n0, 2), yx.float().expand(B, n0, 2)
    )
    mean = total / history.sizes[:, protected:, None]
    theta = t0 + a * mean[..., :1] + b * mean[..., 1:]
    return torch.cat([theta.sin(), theta.cos()], -1)[:, None]  # (B, 1, n, 128)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None):
    """Softmax attention probabilities (B, H, Nq, Nk) and outputs (B, H, Nq, C); logits = q.k."""
    logits = q @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(-1)
    return probs, probs @ v


def measure(
    values: torch.Tensor, history: MergeHistory, rope: torch.Tensor, content: torch.Tensor, beta: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per method: (attention TV distance, relative output error), per photo (B,)."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    B, n0, C = values.shape
    H = content.shape[0]
    scale = (beta / content.pow(2).sum(-1)).sqrt()[:, None]  # logit(i, i) = beta
    c = (content * scale)[None, :, None, :].expand(B, H, n0, -1)
    q = apply_rot_embed_cat(c, rope)
    probs, out = attention(q, q, values[:, None])  # exact: (B, H, n0, n0), (B, H, n0, C)
    source = history.source[:, 1:] - 1  # CLS (protected) dropped: patches -> groups
    sizes = history.sizes[:, 1:]
    n = sizes.shape[1]
    onehot = F.one_hot(source, n).float()  # (B, n0, n)
    # exact mass of every original query over the groups, and the group-mean of exact outputs
    mass = probs @ onehot[:, None]  # (B, H, n0, n)
    center = out - out.mean(dim=2, keepdim=True)
    norm = center.pow(2).sum((1, 2, 3)).sqrt()
    group_mean = (onehot.transpose(1, 2)[:, None] @ out) / sizes[:, None, :, None]
    floor = (
        (group_mean.gather(2, source[:, None, :, None].expand(B, H, n0, C)) - out)
        .pow(2)
        .sum((1, 2, 3))
        .sqrt()
    )
    merged_values = (onehot.transpose(1, 2) @ values) / sizes[..., None]  # (B, n, C)
    bias = sizes.log()[:, None, None, :]
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # (B, H, n0)
    results = {"floor": (torch.zeros(B), floor / norm), "spread": (entropy.exp().mean((1, 2)), None)}
    patches = MergeHistory(history.source, history.sizes)
    for method in METHODS:
        if method == "positions":
            merged = positions_rope(rope, patches, 1, GRID)
        else:
            merged = timm_eva.merged_rope(rope, patches, 1, method)
        qm = apply_rot_embed_cat(c[:, :, :n], merged.expand(B, H, n, -1))
        p_m, o_m = attention(qm, qm, merged_values[:, None], bias)  # (B, H, n, n), (B, H, n, C)
        index = source[:, None, :, None]
        mass_hat = p_m.gather(2, index.expand(B, H, n0, n))  # each original query: its group's row
        tv = 0.5 * (mass_hat - mass).abs().sum(-1).mean((1, 2))
        out_hat = o_m.gather(2, index.expand(B, H, n0, C))
        error = (out_hat - out).pow(2).sum((1, 2, 3)).sqrt() / norm
        results[method] = (tv, error)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=100, help="photos (default 100: 50 + 50)")
    parser.add_argument(
        "--r", type=int, nargs="+", default=[8, 13, 16], help="DINOv2-S schedules (default 8 13 16)"
    )
    parser.add_argument("--betas", type=float, nargs="+", default=[4.0, 16.0, 64.0], help="head sharpness")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument(
        "--student",
        action="store_true",
        help="instead: train a small RoPE Eva on DINOv2-S features, then measure it",
    )
    parser.add_argument("--epochs", type=int, default=30, help="--student: training epochs (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="--student: seed of its init, crops and order")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.student:
        student_main(args)
        return
    from transformers import Dinov2Model

    start = time.perf_counter()
    print(f"load average (1 / 5 / 15 min) at start: {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")
    model = Dinov2Model.from_pretrained(MODEL).eval()
    pixels = photos(args.limit)
    half = len(pixels) // 2
    with torch.no_grad():
        values = model(pixel_values=pixels).last_hidden_state[:, 1:]  # (B, 196, 384) unmerged
        histories = {}
        for r in args.r:
            tome.patch(model, r=r)
            model(pixel_values=pixels)
            histories[r] = model.tome.history
            tome.unpatch(model)
    rope = eva_rope()
    content = torch.randn(args.heads, 64, generator=torch.Generator().manual_seed(0))
    print(
        f"{len(pixels)} photos (calibration: first {half}, held out: last {len(pixels) - half}); DINOv2-S "
        f"at {GRID * 14} px ({GRID}x{GRID} patches); EVA-02-B/16 RoPE; {args.heads} positional heads\n"
    )
    print(
        "| r (tokens left) | beta | method | attn TV cal. | attn TV held out | out err cal. | out err held out |"
    )
    print("|---|---|---|---|---|---|---|")
    wins = {m: 0 for m in METHODS}
    for r, history in histories.items():
        left = history.num_tokens
        for beta in args.betas:
            with torch.no_grad():
                results = measure(values, history, rope, content, beta)
            cal = {m: results[m][1][:half].mean().item() for m in METHODS}
            wins[min(cal, key=cal.get)] += 1
            spread = results.pop("spread")[0].mean().item()
            print(f"| {r} ({left}) | {beta:g} (attends ~{spread:.0f} patches) | | | | | |")
            for method, (tv, err) in results.items():
                tv_text = "– | –" if method == "floor" else f"{tv[:half].mean():.4f} | {tv[half:].mean():.4f}"
                print(f"| | | {method} | {tv_text} | {err[:half].mean():.4f} | {err[half:].mean():.4f} |")
    print(f"\nlowest calibration output error, per (r, beta): {wins}")
    print(
        f"load average (1 / 5 / 15 min) at end: {' / '.join(f'{v:.1f}' for v in os.getloadavg())}; "
        f"{time.perf_counter() - start:.0f}s"
    )


# -- a RoPE model with trained weights: a student of DINOv2-S ---------------------------------------

STUDENT_SIZE = 112  # 8 x 8 patches of 14 px, for DINOv2-S and the student alike
STUDENT_GRID = STUDENT_SIZE // 14


def make_student(seed: int = 0) -> torch.nn.Module:
    """EVA-02-Ti's layout (SwiGLU, axial RoPE), 6 blocks, no absolute position embedding: every
    position it knows comes from RoPE."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, img_size=STUDENT_SIZE, depth=6, num_classes=384,
        use_abs_pos_emb=False, global_pool="token",
    )  # fmt: skip
    model.head_patches = torch.nn.Linear(model.embed_dim, 384)
    return model


def student_features(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS feature (B, 384), patch features (B, 64, 384)); the patches at the original length."""
    tokens = model.forward_features(pixels)
    if getattr(model, "tome", None) is not None:
        tokens = model.tome.unmerge(tokens)
    return model.forward_head(tokens), model.head_patches(tokens[:, 1:])


def augmented(photo: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random resized crops (scale 0.3-1) with flips of one photo, at STUDENT_SIZE."""
    out = []
    _, H, W = photo.shape
    for _ in range(count):
        scale = 0.3 + 0.7 * torch.rand((), generator=generator).item()
        side = int((H * W * scale) ** 0.5)
        top = int(torch.randint(0, H - side + 1, (), generator=generator))
        left = int(torch.randint(0, W - side + 1, (), generator=generator))
        crop = photo[:, top : top + side, left : left + side]
        if torch.rand((), generator=generator) < 0.5:
            crop = crop.flip(-1)
        out.append(F.interpolate(crop[None], size=STUDENT_SIZE, mode="bilinear", antialias=True)[0])
    return torch.stack(out)


def train_student(teacher, train: torch.Tensor, epochs: int, log, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    crops = torch.cat([augmented(p, 8, generator) for p in train])
    crops = torch.cat([F.interpolate(train, size=STUDENT_SIZE, mode="bilinear", antialias=True), crops])
    with torch.no_grad():
        target = torch.cat([teacher(pixel_values=c).last_hidden_state for c in crops.split(64)])
    model = make_student(seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * ((len(crops) + 31) // 32)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    for epoch in range(epochs):
        order = torch.randperm(len(crops), generator=generator)
        total = 0.0
        for batch in order.split(32):
            cls, patches = student_features(model, crops[batch])
            loss = (1 - F.cosine_similarity(patches, target[batch, 1:], dim=-1)).mean()
            loss = loss + (1 - F.cosine_similarity(cls, target[batch, 0], dim=-1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        if epoch % 5 == 4 or epoch == epochs - 1:
            log(f"  epoch {epoch + 1}: loss {total / len(crops):.4f}")
    return model.eval()


def _positions_merged_rope(rope, history, protected, how="mean", valid=None):
    if how == "positions":
        return positions_rope(rope, history, protected, STUDENT_GRID)
    return _MERGED_ROPE(rope, history, protected, how, valid)


_MERGED_ROPE = timm_eva.merged_rope


def student_main(args) -> None:
    from transformers import Dinov2Model

    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    print(f"load average (1 / 5 / 15 min) at start: {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")
    teacher = Dinov2Model.from_pretrained(MODEL).eval()
    full = photos(args.limit, size=224)
    half = len(full) // 2
    train, held = full[:half], full[half:]
    model = train_student(teacher, train, args.epochs, log, args.seed)
    small = F.interpolate(held, size=STUDENT_SIZE, mode="bilinear", antialias=True)
    with torch.no_grad():
        target = teacher(pixel_values=small).last_hidden_state
        cls_ref, patch_ref = student_features(model, small)
        rope = model.rope
        model.rope = None  # the same weights without any position: does the student use RoPE?
        _, patch_nope = student_features(model, small)
        model.rope = rope
    cos = lambda a, b: F.cosine_similarity(a, b, dim=-1).mean().item()  # noqa: E731
    print(
        f"student: EVA-02-Ti layout, 6 blocks, RoPE only (no absolute positions), {STUDENT_SIZE} px "
        f"({STUDENT_GRID}x{STUDENT_GRID} patches), trained {args.epochs} epochs (seed {args.seed}) on {half} photos x 9 crops to "
        f"match DINOv2-S features; on the {len(held)} held-out photos: patch cosine to DINOv2-S "
        f"{cos(patch_ref, target[:, 1:]):.3f} (CLS {cos(cls_ref, target[:, 0]):.3f}); the same weights "
        f"without RoPE: patch cosine to the student {cos(patch_nope, patch_ref):.3f}, to DINOv2-S "
        f"{cos(patch_nope, target[:, 1:]):.3f}\n"
    )
    print("| r | tokens left | rope of merged tokens | patch cosine to unmerged | CLS cosine to unmerged |")
    print("|---|---|---|---|---|")
    # "positions" is no option of tome's: this benchmark's merged_rope computes it.
    saved = timm_eva.ROPE_MERGES
    timm_eva.merged_rope, timm_eva.ROPE_MERGES = _positions_merged_rope, (*saved, "positions")
    try:
        for r in args.r:
            tome.patch(model, r=r)
            for method in METHODS:
                model.tome.rope_merge = method
                with torch.no_grad():
                    cls, patches = student_features(model, small)
                print(
                    f"| {r} | {model.tome.tokens_per_layer[-1]} | {method} | {cos(patches, patch_ref):.4f} | "
                    f"{cos(cls, cls_ref):.4f} |"
                )
            tome.unpatch(model)
    finally:
        timm_eva.merged_rope, timm_eva.ROPE_MERGES = _MERGED_ROPE, saved
    print(
        f"\nload average (1 / 5 / 15 min) at end: {' / '.join(f'{v:.1f}' for v in os.getloadavg())}; "
        f"{time.perf_counter() - start:.0f}s"
    )


if __name__ == "__main__":
    main()
