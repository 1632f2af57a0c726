"""How much of what a query reads survives when an image's visual tokens are merged? A proxy.

No trained vision-language model is reachable offline (issue 24, item 8), so the defaults of
``tome.patch(vlm, visual_tokens=...)`` are measured on a proxy: attention read-outs of many
queries over real visual tokens, before and after the tokens are reduced.

- Visual tokens ``X``: the real pretrained DINOv2-S/14 (``../shared/models/dinov2-small-saliency``)
  on the 100 real photos of ``../shared/images/imagenet-samples`` at 224 px (ImageNet mean / std):
  the 16 x 16 = 256 patch tokens of ``last_hidden_state`` (the CLS token dropped, as LLaVA drops
  it), ``(256, 384)`` per photo. ``--size 336`` gives 24 x 24 = 576 tokens, LLaVA-1.5's count.
- A language model's attention over them, with random fixed (seeded) weights: every token is
  RMS-normalised (a language model's input norm), keys and values are random linear maps of it,
  ``--heads`` heads (8 of 48 channels), logits ``beta * q.k / sqrt(48)``. Two kinds of queries,
  as many as there are tokens: ``self``, the photo's own unmerged tokens through a random query
  map (what image tokens, and text about the image, ask of it), and ``gauss``, random Gaussian
  queries of the same scale. ``beta`` (``--betas``, 1 and 4) sharpens the attention: random
  weights attend broadly, trained heads often sharply.
- Reductions of each photo's tokens to ``k`` (every method gets exactly ``k``): ``random``
  (keep ``k`` random tokens: pruning); ``pool`` (average pooling of the patch grid into an
  ``a x b`` grid of near-equal cells); ``tome`` (:func:`tome.adapters.common.vlm.reduce_features`:
  bipartite soft matching on the features' cosine, size-weighted means: what ``tome.patch``
  does to a VLM's visual tokens). The keys and values of a reduced token are those of its
  features (the maps are linear, so a merged token's key is the mean of its members' keys).
- Proportional attention (``+prop``): ``log(size)`` of each reduced token added to its logits,
  so that a token holding ``s`` originals weighs as ``s`` copies (exactly the full attention when
  the members are equal). Random pruning has sizes 1: no such variant.
- ``k``: the keep fractions of LLaVA's settings, 1/3, 1/4 and 1/9 (576 -> 192, 144, 64), each
  rounded to the nearest ``a x b`` grid with ``|a - b| <= 1``, so that pooling has exactly the
  tokens the other methods have: 256 -> 81 (9x9), 64 (8x8), 30 (5x6).

Reported per photo, then averaged: ``cos``, the mean cosine similarity of each query's output
(all heads) with and without the reduction; ``rel err``, ``||O' - O|| / ||O||``; ``err/signal``,
``||O' - O|| / ||O - U||``, with ``U`` the output of uniform attention over the full tokens
(the mean value, what a query reading nothing in particular gets): the part of what queries
read specifically that is lost. Whether proportional attention is on is decided on photos
0-49 ("tuning") and reported on photos 50-99 ("held out").

    python benchmarks/vlm_fidelity.py               # ~20 s on 2 CPU cores
    python benchmarks/vlm_fidelity.py --size 336    # 576 tokens (LLaVA-1.5): 196 / 144 / 64 kept, ~1 min
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tome.adapters.common.vlm import reduce_features  # noqa: E402
from tome.core import merge as M  # noqa: E402

SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "dinov2-small-saliency"
IMAGES = SHARED / "images" / "imagenet-samples"
FRACTIONS = ((1, 3), (1, 4), (1, 9))
QUERIES = ("self", "gauss")


def photos(size: int) -> torch.Tensor:
    from PIL import Image

    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    out = []
    for path in sorted(IMAGES.glob("*.JPEG")):
        image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
        out.append((pixels.permute(2, 0, 1).float() / 255 - mean) / std)
    return torch.stack(out)


def visual_tokens(size: int) -> torch.Tensor:
    """``(photos, grid * grid, 384)``: DINOv2-S's patch tokens (CLS dropped)."""
    if MODEL.exists():
        from transformers import Dinov2Model

        model = Dinov2Model.from_pretrained(MODEL).eval()
    else:
        from tome.tools.models.loading import load_model

        model = load_model("dinov2-s-saliency").module.eval()
    pixels = photos(size)
    with torch.no_grad():
        chunks = [model(pixel_values=p).last_hidden_state[:, 1:] for p in pixels.split(25)]
    return torch.cat(chunks)


def grid_shape(n: int, fraction: tuple[int, int]) -> tuple[int, int]:
    """The ``a x b`` grid (``a <= b <= a + 1``) nearest ``n * fraction`` tokens."""
    target = n * fraction[0] / fraction[1]
    side = math.isqrt(n)
    shapes = [(a, b) for a in range(1, side + 1) for b in (a, a + 1) if b <= side]
    return min(shapes, key=lambda s: (abs(s[0] * s[1] - target), s[0] * s[1]))


def pool_history(side: int, shape: tuple[int, int], photos_: int) -> M.MergeHistory:
    """Average pooling of a ``side x side`` grid into ``shape`` cells (near-equal, contiguous)."""
    rows = torch.bucketize(
        torch.arange(side), torch.linspace(0, side, shape[0] + 1)[1:-1].round(), right=True
    )
    cols = torch.bucketize(
        torch.arange(side), torch.linspace(0, side, shape[1] + 1)[1:-1].round(), right=True
    )
    source = (rows[:, None] * shape[1] + cols[None, :]).reshape(-1)
    sizes = torch.bincount(source, minlength=shape[0] * shape[1]).float()
    return M.MergeHistory(source.expand(photos_, -1), sizes.expand(photos_, -1))


def random_kept(n: int, k: int, photos_: int, seed: int) -> torch.Tensor:
    """``(photos, k)``: ``k`` random tokens per photo (raster order) to keep; the rest are dropped."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(photos_)])


class Head:
    """A language model's attention over visual tokens, with random fixed weights."""

    def __init__(self, dim: int, heads: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.heads, self.head_dim = heads, dim // heads
        self.wq, self.wk, self.wv = (
            torch.randn(dim, heads * self.head_dim, generator=g) / dim**0.5 for _ in range(3)
        )
        self.g = g

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (P, N, H*C) -> (P, H, N, C)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def queries(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        if kind == "self":
            return self.split(x @ self.wq)
        return self.split(torch.randn(x.shape[0], x.shape[1], self.heads * self.head_dim, generator=self.g))

    def read(self, q: torch.Tensor, x: torch.Tensor, sizes: torch.Tensor | None, beta: float) -> torch.Tensor:
        """Outputs ``(P, Nq, H*C)`` of queries ``q`` over tokens ``x`` (``sizes``: proportional)."""
        out = []
        for i in range(0, x.shape[0], 10):  # 10 photos at a time: (10, H, Nq, N) logits
            k, v = self.split(x[i : i + 10] @ self.wk), self.split(x[i : i + 10] @ self.wv)
            logits = beta * (q[i : i + 10] @ k.transpose(-1, -2)) / self.head_dim**0.5
            if sizes is not None:
                logits = logits + sizes[i : i + 10].log()[:, None, None, :]
            out.append((logits.softmax(-1) @ v).transpose(1, 2).flatten(2))
        return torch.cat(out)


def scores(out: torch.Tensor, exact: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per photo: (cos, rel err, err/signal), ``(3, P)``."""
    cos = F.cosine_similarity(out, exact, dim=-1).mean(-1)
    err = (out - exact).flatten(1).norm(dim=1)
    return torch.stack(
        [cos, err / exact.flatten(1).norm(dim=1), err / (exact - uniform).flatten(1).norm(dim=1)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224, help="pixels (224: 256 tokens; 336: 576)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads of 384 / heads channels")
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 4.0], help="logit scales")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} with {args.threads} threads, "
        f"load average (1 / 5 / 15 min) {' / '.join(f'{v:.2f}' for v in os.getloadavg())}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    x = visual_tokens(args.size)
    P, n, dim = x.shape
    side = math.isqrt(n)
    half = P // 2
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # the language model's RMS norm
    head = Head(dim, args.heads, args.seed)
    queries = {kind: head.queries(kind, x) for kind in QUERIES}
    setups = [(kind, beta) for beta in args.betas for kind in QUERIES]
    exact, uniform = {}, {}
    for kind, beta in setups:
        exact[kind, beta] = head.read(queries[kind], x, None, beta)
        uniform[kind, beta] = head.read(queries[kind], x, None, 0.0)
    print(
        f"{P} photos (tuning: 0-{half - 1}, held out: {half}-{P - 1}); DINOv2-S/14 at {args.size} px: "
        f"{n} visual tokens of {dim}; {args.heads} random heads of {dim // args.heads}; "
        f"{n} queries per photo and kind; {time.perf_counter() - start:.0f}s to here\n"
    )

    results = {}  # (k, method, prop) -> {(kind, beta): (3, P)}
    for fraction in FRACTIONS:
        shape = grid_shape(n, fraction)
        k = shape[0] * shape[1]
        merged, history = reduce_features(x, k)
        pooled_history = pool_history(side, shape, P)
        pooled = M.merge_original(pooled_history, x)
        kept = random_kept(n, k, P, args.seed + k)
        pruned = x.gather(1, kept[..., None].expand(P, k, dim))
        variants = {
            ("random", False): (pruned, None),
            ("pool", False): (pooled, None),
            ("pool", True): (pooled, pooled_history.sizes),
            ("tome", False): (merged, None),
            ("tome", True): (merged, history.sizes),
        }
        for (method, prop), (tokens, sizes) in variants.items():
            results[k, shape, method, prop] = {
                (kind, beta): scores(
                    head.read(queries[kind], tokens, sizes, beta), exact[kind, beta], uniform[kind, beta]
                )
                for kind, beta in setups
            }

    def cell(values: torch.Tensor, what: int) -> str:
        return f"{values[what, :half].mean():.4f} / {values[what, half:].mean():.4f}"

    for beta in args.betas:
        print(f"beta = {beta:g} (cos and err/signal: tuning / held out; rel err: held out)\n")
        header = "| k of n (grid) | method | prop attn |"
        rule = "|---|---|---|"
        for kind in QUERIES:
            header += f" {kind}: cos | {kind}: rel err | {kind}: err/signal |"
            rule += "---|---|---|"
        print(header)
        print(rule)
        for (k, shape, method, prop), by_setup in results.items():
            row = (
                f"| {k} of {n} ({shape[0]}x{shape[1]}, {k / n:.3f}) | {method} | {'on' if prop else 'off'} |"
            )
            for kind in QUERIES:
                values = by_setup[kind, beta]
                row += f" {cell(values, 0)} | {values[1, half:].mean():.4f} | {cell(values, 2)} |"
            print(row)
        print()

    # The open question: proportional attention on or off, decided on the tuning half.
    print(
        "proportional attention, on vs off: mean err/signal over query kinds, betas and k (lower is better)\n"
    )
    print(
        "| method | off: tuning | on: tuning | choice (tuning) | off: held out | on: held out | held out agrees |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in ("pool", "tome"):
        means = {}
        for prop in (False, True):
            stacked = torch.stack(
                [
                    v[2]
                    for (k, s, m, p), by_setup in results.items()
                    if m == method and p == prop
                    for v in by_setup.values()
                ]
            )
            means[prop] = (stacked[:, :half].mean().item(), stacked[:, half:].mean().item())
        choice = means[True][0] < means[False][0]
        agrees = (means[True][1] < means[False][1]) == choice
        print(
            f"| {method} | {means[False][0]:.4f} | {means[True][0]:.4f} | {'on' if choice else 'off'} | "
            f"{means[False][1]:.4f} | {means[True][1]:.4f} | {'yes' if agrees else 'no'} |"
        )
    wins = sum(
        int((by_on[s][2, half:] < by_off[s][2, half:]).sum())
        for (k, shape, m, p), by_on in results.items()
        if m == "tome" and p
        for by_off in [results[k, shape, "tome", False]]
        for s in by_on
    )
    total = sum(P - half for (k, shape, m, p), by in results.items() if m == "tome" and p for _ in by)
    print(
        f"\ntome, held out: proportional attention lowers err/signal in {wins} of {total} (photo, setting) pairs"
    )
    print(
        f"load average (1 / 5 / 15 min) at end: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}; "
        f"{time.perf_counter() - start:.0f}s"
    )


if __name__ == "__main__":
    main()
