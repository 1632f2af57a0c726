"""Where does VideoMAE's temporal option help? A proxy on real pixels and real pretrained layers.

No trained VideoMAE weights are reachable offline, so ``tome.patch(videomae, ratio=..., temporal=...)``
is measured on a proxy:

- Clips from the real photos of ``../shared/images/imagenet-samples``, made by
  ``benchmarks/video_fidelity.py``'s own functions (imported): ``still`` (the photo with a little
  pixel noise per frame), ``pan`` (a 224 px window sliding ``--pan`` px per frame), ``zoom`` (a
  centred crop shrinking to 70%), ``cut`` (a pan over photo ``i``, then one over photo ``i + 1``).
- The encoder: a real ``transformers.VideoMAEModel`` (224 px, patch 14, tubelet 2, ``--frames``
  frames: ``frames / 2`` time slices of 16 x 16 tubelets) whose every weight is the real pretrained
  DINOv2-S/14's (``../shared/models/dinov2-small-saliency``): the 2-frame tubelet embedding is
  DINOv2's patch embedding of the two frames' mean; DINOv2's position embeddings (resized to
  16 x 16) repeat in every slice; LayerScale is folded into the output projections; the key bias
  is dropped (it adds the same logit to every key of a query: softmax does not see it); the class
  token is gone (VideoMAE has none). It computes what DINOv2 computes with every slice's tokens
  attending to every slice's: a video encoder with trained image layers, not a trained video
  model.
- Each clip runs unpatched, then patched with the same schedule (``ratio``: the share of its
  tokens each layer removes, so every method has the same token count in every layer), with
  ``temporal=False`` (tome's default matching), ``True`` (own place in the adjacent slices) and
  ``"window"`` (3 x 3 places). Errors against the unpatched run, on the final tokens (after the
  final norm):
  ``tokens``: ``||X' - X|| / ||X - mean(X)||`` with ``X'`` the merged tokens unmerged to every
  tubelet; ``pooled``: ``1 - cos`` of the clip's mean token (what ``VideoMAEForVideoClassification``
  reads) with the unpatched one's; ``slice read-out``: ``video_fidelity.py``'s per-frame read-out
  error (random fixed attention heads read each time slice, over its own tokens exactly vs over
  the merged tokens that hold any of them, with proportional attention), queries ``self`` and
  ``gauss``, β = 1 and 4.
- Photos 0-1 chose the option's default (the "choose" table); photos 2-9 are held out and
  reported separately.

    python benchmarks/videomae_temporal.py                 # 2 + 8 photos, 8 frames: ~5-10 min on 2 loaded cores
    python benchmarks/videomae_temporal.py --held-out 40 --frames 16
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from video_fidelity import IMAGES, KINDS, MODEL, SIZE, Head, load_photos, make_clip, per_frame_error  # noqa: E402

import tome  # noqa: E402

METHODS = {"default": False, "temporal": True, "window": "window"}
PATCH = 14


def videomae_from_dinov2(frames: int):
    """A ``VideoMAEModel`` carrying DINOv2-S/14's pretrained weights (see the module docstring)."""
    from transformers import Dinov2Model, VideoMAEConfig, VideoMAEModel

    dino = Dinov2Model.from_pretrained(MODEL).eval()
    c = dino.config
    config = VideoMAEConfig(
        image_size=SIZE, patch_size=PATCH, num_frames=frames, tubelet_size=2, hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        intermediate_size=c.hidden_size * c.mlp_ratio, hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
        qkv_bias=True, use_mean_pooling=False, attn_implementation="sdpa",
    )  # fmt: skip
    video = VideoMAEModel(config).eval()
    with torch.no_grad():
        conv = dino.embeddings.patch_embeddings.projection
        projection = video.embeddings.patch_embeddings.projection
        projection.weight.copy_(conv.weight[:, :, None].expand(-1, -1, 2, -1, -1) / 2)
        projection.bias.copy_(conv.bias)
        grid = SIZE // PATCH
        dummy = torch.zeros(1, 1 + grid * grid, c.hidden_size)
        position = dino.embeddings.interpolate_pos_encoding(dummy, SIZE, SIZE)[:, 1:]
        video.embeddings.position_embeddings = position.repeat(1, frames // 2, 1)
        for ours, theirs in zip(video.encoder.layer, dino.encoder.layer, strict=True):
            ours.layernorm_before.load_state_dict(theirs.norm1.state_dict())
            ours.layernorm_after.load_state_dict(theirs.norm2.state_dict())
            attention, source = ours.attention.attention, theirs.attention
            attention.query.load_state_dict(source.q_proj.state_dict())
            attention.value.load_state_dict(source.v_proj.state_dict())
            attention.key.weight.copy_(source.k_proj.weight)  # VideoMAE's key has no bias (see above)
            scale1, scale2 = theirs.layer_scale1.lambda1, theirs.layer_scale2.lambda1
            ours.attention.output.dense.weight.copy_(source.o_proj.weight * scale1[:, None])
            ours.attention.output.dense.bias.copy_(source.o_proj.bias * scale1)
            ours.intermediate.dense.load_state_dict(theirs.mlp.fc1.state_dict())
            ours.output.dense.weight.copy_(theirs.mlp.fc2.weight * scale2[:, None])
            ours.output.dense.bias.copy_(theirs.mlp.fc2.bias * scale2)
        video.layernorm.load_state_dict(dino.layernorm.state_dict())
    return video


def pixels(clip: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((clip - mean) / std)[None]


def rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@torch.no_grad()
def measure(model, clip, ratios, head, queries_g, betas) -> dict:
    """(ratio, method) -> {"tokens", "pooled", (query, beta): read-out error}."""
    tome.unpatch(model)
    x = pixels(clip)
    exact = model(x).last_hidden_state[0]
    N, D = exact.shape
    T = clip.shape[0] // 2
    S = N // T
    frames = rms(exact).view(T, S, D)
    queries = {
        "self": [head.split(frames[f] @ head.wq) for f in range(T)],
        "gauss": [head.split(torch.randn(S, D, generator=queries_g)) for f in range(T)],
    }
    spread = (exact - exact.mean(0)).norm()
    out = {}
    for ratio in ratios:
        for method, temporal in METHODS.items():
            tome.patch(model, ratio=ratio, temporal=temporal)
            merged = model(x).last_hidden_state[0]
            source = model.tome.source[0]
            full = merged[source]
            row = {
                "tokens": ((full - exact).norm() / spread).item(),
                "pooled": 1 - F.cosine_similarity(full.mean(0), exact.mean(0), dim=0).item(),
                "kept": merged.shape[0] / N,
            }
            row.update(per_frame_error(head, queries, frames, rms(merged), source, betas))
            out[ratio, method] = row
    tome.unpatch(model)
    return out


def table(title: str, results: dict, ratios, betas) -> None:
    columns = ["tokens", "pooled", *[(q, b) for b in betas for q in ("self", "gauss")]]
    names = ["tokens", "pooled 1-cos", *[f"{q} β={b:g}" for q, b in columns[2:]]]
    print(f"\n{title}\n")
    print("| clip | ratio | kept | method | " + " | ".join(names) + " |")
    print("|" + "---|" * (4 + len(names)))
    for kind in (*KINDS, "all"):
        for ratio in ratios:
            for method in METHODS:
                runs = [r[ratio, method] for (k, _), r in results.items() if kind in ("all", k)]
                kept = sum(r["kept"] for r in runs) / len(runs)
                cells = " | ".join(f"{sum(r[c] for r in runs) / len(runs):.4f}" for c in columns)
                print(f"| {kind} | {ratio:g} | {kept:.2f} | {method} | {cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--choose", type=int, default=2, help="photos 0..choose-1 chose the default")
    parser.add_argument("--held-out", type=int, default=8, help="photos after those, reported apart")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--pan", type=int, default=8, help="pixels a pan moves per frame")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} with {args.threads} threads, "
        f"load average {' / '.join(f'{v:.2f}' for v in os.getloadavg())}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    if not IMAGES.is_dir() or not MODEL.is_dir():
        raise SystemExit(f"needs {IMAGES} and {MODEL} (the shared folder beside the clone)")
    model = videomae_from_dinov2(args.frames)
    total = args.choose + args.held_out
    photos = load_photos(total, args.frames, args.pan, 0)
    head = Head(model.config.hidden_size, 8, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    results: dict = {}
    for p in range(len(photos)):
        for kind in KINDS:
            clip = make_clip(kind, photos[p], photos[(p + 1) % len(photos)], args.frames, args.pan, g)
            results[p, kind] = measure(model, clip, args.ratios, head, g, args.betas)
        print(f"  {p + 1} photos, {time.perf_counter() - start:.0f}s", file=sys.stderr)
    T = args.frames // 2
    print(
        f"\nVideoMAE layout with DINOv2-S/14's pretrained layers: {args.frames} frames, tubelet 2 -> {T} slices "
        f"x 256 tubelets = {T * 256} tokens; errors against the unpatched run (lower is better); `kept`: "
        "final tokens / original; `ratio`: share of its tokens every layer removes"
    )
    choose = {key: r for key, r in results.items() if key[0] < args.choose}
    held = {key: r for key, r in results.items() if key[0] >= args.choose}
    table(
        f"choose: photos 0-{args.choose - 1}",
        {(k, p): r for (p, k), r in choose.items()},
        args.ratios,
        args.betas,
    )
    table(
        f"held out: photos {args.choose}-{total - 1}",
        {(k, p): r for (p, k), r in held.items()},
        args.ratios,
        args.betas,
    )
    print(
        f"\nload average at end {' / '.join(f'{v:.2f}' for v in os.getloadavg())}; {time.perf_counter() - start:.0f}s"
    )


if __name__ == "__main__":
    main()
