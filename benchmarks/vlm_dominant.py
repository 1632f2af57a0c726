"""Dominant tokens kept whole (``visual_dominant``, VisionZip's split) vs tome's plain merge, on
the fidelity proxy of ``benchmarks/vlm_fidelity.py`` (read its docstring: real DINOv2-S/14 patch
tokens of 100 real photos, attention read-outs of many queries through random fixed heads; no
trained vision-language model is reachable offline, so this is not a VLM's accuracy).

Dominant tokens: the ``d`` patch tokens DINOv2-S's class token attends to most at its last
layer (the layer whose output the proxy reads, as LLaVA reads its ``vision_feature_layer``),
averaged over heads (eager attention weights; tome itself reads them with a hook, SDPA on).
Variants at each ``k`` (all keep exactly ``k`` tokens, proportional attention on where sizes
exist): ``tome`` (plain merge); ``dominant 0.84`` (``d = floor(0.84375 k)``: VisionZip's
LLaVA-1.5 split, the rest merged by tome's core, :func:`reduce_images_dominant`); ``dominant
0.5``; ``cls top-k`` (every kept token dominant, the rest dropped: VisionZip without contextual
tokens) and ``random`` pruning for scale. Reported: mean err/signal (lower is better) over
query kinds and betas, tuning photos 0-49 / held out 50-99; the choice is made on tuning.

    python benchmarks/vlm_dominant.py               # 224 px: 256 tokens -> 81 / 64 / 30
    python benchmarks/vlm_dominant.py --size 336    # 576 tokens (LLaVA-1.5's count)
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from vlm_fidelity import FRACTIONS, MODEL, QUERIES, Head, grid_shape, photos, random_kept, scores  # noqa: E402

from tome.adapters.common.dominant import reduce_images_dominant  # noqa: E402
from tome.adapters.common.vlm import reduce_features  # noqa: E402


def tokens_and_cls_attention(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, n, 384)`` patch tokens of the last layer and ``(P, n)`` the class token's attention
    over them at that layer, averaged over heads."""
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(MODEL, attn_implementation="eager").eval()
    tokens, attention = [], []
    with torch.no_grad():
        for chunk in photos(size).split(25):
            out = model(pixel_values=chunk, output_attentions=True)
            tokens.append(out.last_hidden_state[:, 1:])
            attention.append(out.attentions[-1][:, :, 0, 1:].mean(1))
    return torch.cat(tokens), torch.cat(attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--heads", type=int, default=8)
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
    x, cls = tokens_and_cls_attention(args.size)
    P, n, dim = x.shape
    half = P // 2
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # the language model's RMS norm
    head = Head(dim, args.heads, args.seed)
    queries = {kind: head.queries(kind, x) for kind in QUERIES}
    setups = [(kind, beta) for beta in args.betas for kind in QUERIES]
    exact = {(k, b): head.read(queries[k], x, None, b) for k, b in setups}
    uniform = {(k, b): head.read(queries[k], x, None, 0.0) for k, b in setups}
    print(f"{P} photos, {n} tokens each; {time.perf_counter() - start:.0f}s to here\n")
    print("mean err/signal over query kinds and betas (lower is better): tuning / held out\n")
    print("| k of n | tome | dominant 0.84 | dominant 0.5 | cls top-k (pruning) | random (pruning) |")
    print("|---|---|---|---|---|---|")
    totals: dict[str, list[torch.Tensor]] = {}
    for fraction in FRACTIONS:
        shape = grid_shape(n, fraction)
        k = shape[0] * shape[1]
        merged, history = reduce_features(x, k)
        variants = {"tome": (merged, history.sizes)}
        for name, share in (("dominant 0.84", 0.84375), ("dominant 0.5", 0.5), ("cls top-k (pruning)", 1.0)):
            out, _, sizes = reduce_images_dominant(list(x), list(cls), k, None, share)
            variants[name] = (torch.stack(out), torch.stack(sizes))
        kept = random_kept(n, k, P, args.seed + k)
        variants["random (pruning)"] = (x.gather(1, kept[..., None].expand(P, k, dim)), None)
        row = f"| {k} of {n} ({k / n:.3f}) |"
        for name, (tokens, sizes) in variants.items():
            err = torch.stack(
                [
                    scores(head.read(queries[kd], tokens, sizes, b), exact[kd, b], uniform[kd, b])[2]
                    for kd, b in setups
                ]
            ).mean(0)  # (P,)
            totals.setdefault(name, []).append(err)
            row += f" {err[:half].mean():.4f} / {err[half:].mean():.4f} |"
        print(row)
    print()
    means = {name: torch.stack(v).mean(0) for name, v in totals.items()}
    best = min(means, key=lambda name: means[name][:half].mean().item())
    print(f"best on tuning (mean over k): {best}")
    for name, err in means.items():
        wins = int((err[half:] < means["tome"][half:]).sum())
        print(
            f"  {name}: tuning {err[:half].mean():.4f}, held out {err[half:].mean():.4f}; "
            f"better than tome on {wins} of {P - half} held-out photos"
        )
    print(
        f"{time.perf_counter() - start:.0f}s; load average at end {' / '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
