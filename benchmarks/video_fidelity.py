"""How much of what a query reads from a video's frames survives when the video's tokens are
merged across frames and inside each scene? A proxy, on real pixels, with a planted cut.

No trained video language model is reachable offline, so ``tome.patch(vlm, video_ratio=...)``
is measured on a proxy built like ``benchmarks/vlm_fidelity.py`` (read that one first):

- Clips from the real photos of ``../shared/images/imagenet-samples``, ``--frames`` frames of
  224 px each (one frame = one temporal group here), four kinds per photo: ``still`` (the photo,
  with a little pixel noise per frame: sensor noise), ``pan`` (a 224 px window sliding
  ``--pan`` px per frame across the photo), ``zoom`` (a centred crop shrinking from 100% to 70%),
  ``cut`` (the first half a pan over photo ``i``, the second half a pan over photo ``i + 1``:
  a planted cut).
- Visual tokens: the real pretrained DINOv2-S/14 (``../shared/models/dinov2-small-saliency``),
  16 x 16 = 256 patch tokens per frame (CLS dropped), RMS-normalised; a clip of 8 frames is
  2048 tokens.
- Read-outs per frame: for each frame, queries (``self``: the frame's own tokens through a random
  query map; ``gauss``: random Gaussian queries) attend, with random fixed weights (8 heads of
  48, logits ``beta * q.k / sqrt(48)``), over the frame's own 256 tokens (exact), and over the
  reduced tokens that hold any of that frame's tokens, each with ``log`` of how many of the
  frame's tokens it holds added to its logits (proportional attention, as ``tome.patch`` does in
  the language model). ``err/signal`` = ``||O' - O|| / ||O - U||`` (``U``: uniform attention over
  the frame: what reading nothing in particular gives), averaged over frames, clips and photos.
- Reductions, each to the same number of tokens per clip: ``video`` (``merge_video``: cuts,
  temporal runs, spatial inside segments: what ``tome.patch(vlm, video_ratio=r)`` does to a
  video's tokens); ``per frame`` (each frame merged alone by tome's image path,
  ``reduce_features``, to the same share: what treating every frame as an image gives);
  ``random`` (that many random tokens of each frame kept: pruning).
- Cuts: for the ``cut`` clips, how many merged tokens hold tokens from both sides of the planted
  cut (must be 0), and whether the cut was found; for the other kinds, how many cuts were found
  where there is none (a false cut only restricts merging).

    python benchmarks/video_fidelity.py                 # 40 photos, 8 frames: ~2-4 min on 2 cores
    python benchmarks/video_fidelity.py --photos 100 --frames 16
    python benchmarks/video_fidelity.py --photos 2 --skip 0 --variants "" spatial_quota=runs

``--variants``: ``merge_video`` settings compared side by side, each a comma-separated list of
``name=value`` (``""``: the defaults, the row ``video``); a row per variant, named by its settings.
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

from tome.adapters.common.video import (  # noqa: E402
    centred_units,
    frame_similarity,
    kept_video_tokens,
    merge_video,
)
from tome.adapters.common.vlm import reduce_features  # noqa: E402

SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "dinov2-small-saliency"
IMAGES = SHARED / "images" / "imagenet-samples"
KINDS = ("still", "pan", "zoom", "cut")
SIZE = 224


def load_photos(count: int, frames: int, pan: int, skip: int = 0) -> list[torch.Tensor]:
    """``count`` photos (after the first ``skip``) as ``(3, 224, 224 + frames * pan)`` tensors in
    [0, 1]."""
    from PIL import Image

    out = []
    for path in sorted(IMAGES.glob("*.JPEG"))[skip : skip + count]:
        image = Image.open(path).convert("RGB").resize((SIZE + frames * pan, SIZE), Image.BICUBIC)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        out.append(pixels.reshape(SIZE, SIZE + frames * pan, 3).permute(2, 0, 1).float() / 255)
    return out


def make_clip(kind: str, photo: torch.Tensor, other: torch.Tensor, frames: int, pan: int, g) -> torch.Tensor:
    """``(frames, 3, 224, 224)`` in [0, 1]."""
    if kind == "still":
        base = photo[:, :, :SIZE]
        return (base + 0.01 * torch.randn(frames, *base.shape, generator=g)).clamp(0, 1)
    if kind == "pan":
        return torch.stack([photo[:, :, f * pan : f * pan + SIZE] for f in range(frames)])
    if kind == "zoom":
        base = photo[:, :, :SIZE]
        out = []
        for f in range(frames):
            side = round(SIZE * (1 - 0.3 * f / max(frames - 1, 1)))
            top = (SIZE - side) // 2
            crop = base[None, :, top : top + side, top : top + side]
            out.append(F.interpolate(crop, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0])
        return torch.stack(out)
    half = frames // 2
    first = make_clip("pan", photo, other, half, pan, g)
    second = make_clip("pan", other, photo, frames - half, pan, g)
    return torch.cat([first, second])


def tokens(model, clips: torch.Tensor) -> torch.Tensor:
    """``(frames, 256, 384)`` DINOv2-S patch tokens, RMS-normalised."""
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        x = model(pixel_values=(clips - mean) / std).last_hidden_state[:, 1:]
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Head:
    def __init__(self, dim: int, heads: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.heads, self.head_dim = heads, dim // heads
        self.wq, self.wk, self.wv = (torch.randn(dim, dim, generator=g) / dim**0.5 for _ in range(3))
        self.g = g

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (N, H*C) -> (H, N, C)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(0, 1)

    def read(
        self, q: torch.Tensor, x: torch.Tensor, log_sizes: torch.Tensor | None, beta: float
    ) -> torch.Tensor:
        k, v = self.split(x @ self.wk), self.split(x @ self.wv)
        logits = beta * (q @ k.transpose(-1, -2)) / self.head_dim**0.5
        if log_sizes is not None:
            logits = logits + log_sizes[None, None, :]
        return (logits.softmax(-1) @ v).transpose(0, 1).flatten(1)


def per_frame_error(head, queries, frames, merged, source, betas) -> dict:
    """Mean err/signal over frames, per (query kind, beta): frame ``f``'s queries over its own
    tokens vs over the merged tokens holding any of them (log of how many, added)."""
    T, S, _ = frames.shape
    k = merged.shape[0]
    result = {}
    for kind, q_all in queries.items():
        for beta in betas:
            errs = []
            for f in range(T):
                q = q_all[f]
                exact = head.read(q, frames[f], None, beta)
                uniform = head.read(q, frames[f], None, 0.0)
                counts = torch.bincount(source[f * S : (f + 1) * S], minlength=k).float()
                held = counts > 0
                out = head.read(q, merged[held], counts[held].log(), beta)
                errs.append(((out - exact).norm() / (exact - uniform).norm()).item())
            result[kind, beta] = sum(errs) / len(errs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument(
        "--skip",
        type=int,
        default=2,
        help="photos left out first: 0-1 chose LINK_SIMILARITY, the spatial grouping and the variant (default 2: held out)",
    )
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--pan", type=int, default=8, help="pixels a pan moves per frame")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95])
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[""],
        help='merge_video settings to compare, e.g. "" spatial_quota=runs (default: "" only)',
    )
    args = parser.parse_args()
    variants = {_label(spec): _settings(spec) for spec in args.variants}
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} with {args.threads} threads, "
        f"load average {' / '.join(f'{v:.2f}' for v in os.getloadavg())}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(MODEL).eval()
    photos = load_photos(args.photos, args.frames, args.pan, args.skip)
    P, T = len(photos), args.frames
    head = Head(384, 8, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    # (kind, ratio, method) -> list of per-clip dicts; cut statistics; frame similarities
    errors: dict = {}
    crossing = {r: 0 for r in args.ratios}
    found, false_cuts, similarities = 0, {kind: 0 for kind in KINDS}, {kind: [] for kind in KINDS}
    for p in range(P):
        for kind in KINDS:
            clip = make_clip(kind, photos[p], photos[(p + 1) % P], T, args.pan, g)
            frames = tokens(model, clip)  # (T, 256, 384)
            S, D = frames.shape[1:]
            video = frames.reshape(T * S, D)
            sims = frame_similarity(centred_units(frames))
            similarities[kind].append(sims[1:])
            queries = {
                "self": [head.split(frames[f] @ head.wq) for f in range(T)],
                "gauss": [head.split(torch.randn(S, D, generator=g)) for f in range(T)],
            }
            for ratio in args.ratios:
                outs = {
                    label: merge_video(video, T, kept_video_tokens(T * S, ratio), **settings)
                    for label, settings in variants.items()
                }
                out = outs[next(iter(variants))]  # cuts found: the same for every variant
                cut_at = T // 2
                segments = out.segments.tolist()
                for merged in outs.values() if kind == "cut" else ():  # crossings: every variant
                    side = (torch.arange(T * S) >= cut_at * S).long()
                    k = merged.features.shape[0]
                    both = torch.zeros(k, 2).index_put_(
                        (merged.source, side), torch.ones(T * S), accumulate=True
                    )
                    crossing[ratio] += int(((both > 0).sum(1) == 2).sum())
                if ratio == args.ratios[0]:  # cuts do not depend on the ratio
                    planted = kind == "cut" and segments[cut_at] != segments[cut_at - 1]
                    found += int(planted)
                    false_cuts[kind] += len(set(segments)) - 1 - int(planted)
                keep_f = kept_video_tokens(S, ratio)
                pf, history = reduce_features(frames, keep_f)
                pf_source = (history.source + torch.arange(T)[:, None] * keep_f).reshape(-1)
                rg = torch.Generator().manual_seed(args.seed + p)
                kept = torch.stack([torch.randperm(S, generator=rg)[:keep_f].sort().values for _ in range(T)])
                rand_tokens = frames.gather(1, kept[..., None].expand(T, keep_f, D)).reshape(-1, D)
                # random: each kept token holds itself; the dropped ones hold nothing (-1 -> own slot)
                rand_source = torch.full((T, S), -1)
                rand_source.scatter_(1, kept, torch.arange(T * keep_f).reshape(T, keep_f))
                methods = {label: (v.features, v.source) for label, v in outs.items()}
                methods["per frame"] = (pf.reshape(-1, D), pf_source)
                for method, (merged, source) in methods.items():
                    errors.setdefault((kind, ratio, method), []).append(
                        per_frame_error(head, queries, frames, merged, source, args.betas)
                    )
                rand = _random_error(head, queries, frames, rand_tokens, rand_source, args.betas)
                errors.setdefault((kind, ratio, "random"), []).append(rand)
        if p % 10 == 9:
            print(f"  {p + 1} photos, {time.perf_counter() - start:.0f}s", file=sys.stderr)

    setups = [(kind, beta) for beta in args.betas for kind in ("self", "gauss")]
    print(
        f"\n{P} photos (from photo {args.skip}) x {len(KINDS)} clips of {T} frames (224 px, DINOv2-S/14: {T} x 256 tokens); "
        f"err/signal of per-frame read-outs, mean over frames, clips and photos (lower is better)\n"
    )
    header = "| clip | video_ratio | method | " + " | ".join(f"{q} β={b:g}" for q, b in setups) + " |"
    print(header)
    print("|" + "---|" * (3 + len(setups)))
    for kind in KINDS:
        for ratio in args.ratios:
            for method in (*variants, "per frame", "random"):
                runs = errors[kind, ratio, method]
                cells = " | ".join(
                    f"{sum(r[q, b] for r in runs) / len(runs):.4f}"
                    for b in args.betas
                    for q in ("self", "gauss")
                )
                print(f"| {kind} | {ratio} | {method} | {cells} |")
    methods = (*variants, "per frame", "random")
    print(
        "\nsummary: the mean of the four read-out columns above, per clip and ratio (lower is better; "
        "best of the merges in bold)\n"
    )
    print("| clip | video_ratio | " + " | ".join(methods) + " |")
    print("|" + "---|" * (2 + len(methods)))
    totals = {m: [] for m in methods}
    for kind in KINDS:
        for ratio in args.ratios:
            cells = {}
            for method in methods:
                runs = errors[kind, ratio, method]
                cells[method] = sum(sum(r.values()) / len(r) for r in runs) / len(runs)
                totals[method].append(cells[method])
            best = min(v for m, v in cells.items() if m != "random")
            row = " | ".join(f"**{v:.4f}**" if v == best else f"{v:.4f}" for v in cells.values())
            print(f"| {kind} | {ratio} | {row} |")
    row = " | ".join(f"{sum(v) / len(v):.4f}" for v in totals.values())
    print(f"| all | all | {row} |")
    print("\nframe-to-frame similarity (centred cosine, same place, mean over places): min / median / max")
    for kind in KINDS:
        values = torch.cat(similarities[kind])
        if kind == "cut":
            at = torch.stack(similarities[kind])[:, T // 2 - 1]
            rest = torch.cat([torch.cat([s[: T // 2 - 1], s[T // 2 :]]) for s in similarities[kind]])
            print(f"- cut, at the planted cut: {at.min():.3f} / {at.median():.3f} / {at.max():.3f}")
            values = rest
        print(
            f"- {kind}{', elsewhere' if kind == 'cut' else ''}: {values.min():.3f} / {values.median():.3f} / {values.max():.3f}"
        )
    print(f"\nplanted cuts found: {found} of {P}")
    print(
        f"merged tokens holding both sides of a planted cut ({len(variants)} variant(s)): "
        + ", ".join(f"{crossing[r]} at video_ratio {r}" for r in args.ratios)
    )
    print(
        "cuts found where there is none: "
        + ", ".join(
            f"{k} {v} (of {P * (T - 1) - (P if k == 'cut' else 0)} frame pairs)"
            for k, v in false_cuts.items()
        )
    )
    print(
        f"load average at end {' / '.join(f'{v:.2f}' for v in os.getloadavg())}; {time.perf_counter() - start:.0f}s"
    )


def _label(spec: str) -> str:
    return "video" if not spec else f"video {spec}"


def _settings(spec: str) -> dict:
    """``"spatial_quota=runs,link_similarity=0.99"`` -> merge_video keyword arguments."""
    out: dict = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            out[name] = value
    return out


def _random_error(head, queries, frames, rand_tokens, rand_source, betas) -> dict:
    T, _S, _ = frames.shape
    keep_f = rand_tokens.shape[0] // T
    result = {}
    for kind, q_all in queries.items():
        for beta in betas:
            errs = []
            for f in range(T):
                q = q_all[f]
                exact = head.read(q, frames[f], None, beta)
                uniform = head.read(q, frames[f], None, 0.0)
                out = head.read(q, rand_tokens[f * keep_f : (f + 1) * keep_f], None, beta)
                errs.append(((out - exact).norm() / (exact - uniform).norm()).item())
            result[kind, beta] = sum(errs) / len(errs)
    return result


if __name__ == "__main__":
    main()
