"""Cost of one token-merging step next to one transformer block, and memory of source tracking.

For a ViT-S sized sequence (C = 384, 6 heads) at 224 px (N0 = 257 with 14 px patches) and 518 px
(N0 = 1370), this prints

- the median time of one matching + merge step: ``TokenMerger(keys, r, protected=1)`` on keys
  ``(B, N, 64)`` (attention keys averaged over heads) plus ``merge`` of ``x`` ``(B, N, 384)``;
- the median time of one timm ViT-S block forward (``eval``, ``no_grad``) on ``(B, N, 384)``;
- their ratio: how much of a block's time the merge step costs;
- the memory the merge history (``source`` (B, N0) int64 + ``sizes`` (B, N) float32) holds over a
  12-layer chain, against the dense ``(B, N, N0)`` float32 matrix the seed and ToMe keep.

Timings interleave the merge step and the block in every repetition (so drifts in clock speed or
background load hit both alike) and report medians. Uses torch's default thread count.

    python benchmarks/merge_step.py                 # both sizes, ~1-2 minutes on 2 CPU cores
    python benchmarks/merge_step.py --sizes 257 --r 16 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from tome import TokenMerger, max_r
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tome import TokenMerger, max_r

DEFAULT_R = {257: 16, 1370: 64}  # 1370: ~N0 / 21, a similar share of tokens per layer as 16 / 257


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, inner: int) -> float:
    """Seconds per call of ``fn``, averaged over ``inner`` back-to-back calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / inner


def make_block(dim: int, heads: int, device: torch.device) -> torch.nn.Module:
    from timm.models.vision_transformer import Block

    return Block(dim=dim, num_heads=heads).to(device).eval()


def bench_size(args, n0: int, r: int, device: torch.device, block: torch.nn.Module) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    B, C, D = args.batch, args.dim, args.key_dim
    keys = torch.randn(B, n0, D, generator=gen).to(device)
    x = torch.randn(B, n0, C, generator=gen).to(device)

    def matching():
        return TokenMerger(keys, r, protected=1)

    tm = matching()

    def merge():
        return tm.merge(x)

    def step():
        return TokenMerger(keys, r, protected=1).merge(x)

    def block_forward():
        return block(x)

    # cheap calls are repeated back to back so one measurement lasts a few ms at least
    inner_step = max(1, args.inner if args.inner else (20 if n0 <= 400 else 5))
    timings = {"matching": [], "merge": [], "step": [], "block": []}
    with torch.no_grad():
        for _ in range(args.warmup):
            step()
            block_forward()
        for _ in range(args.repeats):
            # interleaved: every repetition times all of them once
            timings["matching"].append(_time(matching, device, inner_step))
            timings["merge"].append(_time(merge, device, inner_step))
            timings["step"].append(_time(step, device, inner_step))
            timings["block"].append(_time(block_forward, device, 1))
    return {name: statistics.median(values) for name, values in timings.items()}


def chain_memory(batch: int, n0: int, r: int, layers: int, key_dim: int, device: torch.device) -> dict:
    """Bytes held by the merge history after every layer of a ``layers``-deep chain."""

    def nbytes(t: torch.Tensor) -> int:
        return t.untyped_storage().nbytes()

    gen = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randn(batch, n0, key_dim, generator=gen).to(device)
    adm, peak_ours, peak_dense, peak_plan = None, 0, 0, 0
    n = n0
    for _ in range(layers):
        step_r = min(r, max_r(n, 1))
        tm = TokenMerger(tokens, step_r, adm=adm, protected=1)
        tokens, adm = tm(tokens), tm.adm
        n = tokens.shape[1]
        peak_ours = max(peak_ours, nbytes(adm.source) + nbytes(adm.sizes))
        plan = tm.plan
        peak_plan = max(peak_plan, sum(nbytes(t) for t in (plan.index, plan.kept, plan.src, plan.dst)))
        # what the seed / ToMe keep instead: a dense (B, N, N0) float32 matrix
        peak_dense = max(peak_dense, batch * n * n0 * 4)
    # sanity: the history is complete
    assert int(adm.sizes.sum()) == batch * n0
    return {"ours": peak_ours, "plan": peak_plan, "dense": peak_dense, "final_tokens": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[257, 1370], help="sequence lengths N0")
    parser.add_argument(
        "--r",
        type=int,
        nargs="+",
        default=None,
        help="tokens removed per step, one per size (default 16, 64)",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=384, help="token width C (ViT-S: 384)")
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--key-dim", type=int, default=64, help="width of the similarity keys (head dim)")
    parser.add_argument("--layers", type=int, default=12, help="depth of the chain for the memory figure")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 9 / 5)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--inner", type=int, default=0, help="merge-step calls per timing (default 20 / 5)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    if args.r is None:
        rs = [DEFAULT_R.get(n0, max(1, n0 // 21)) for n0 in args.sizes]
    elif len(args.r) == 1:
        rs = args.r * len(args.sizes)
    elif len(args.r) == len(args.sizes):
        rs = args.r
    else:
        parser.error(f"--r: give one value, or one per size ({len(args.sizes)}), got {len(args.r)}")
    for n0, r in zip(args.sizes, rs, strict=True):
        if not 0 <= r <= max_r(n0, 1):
            parser.error(f"--r: at N0 = {n0} r must be in [0, {max_r(n0, 1)}], got {r}")

    device = torch.device(args.device)
    block = make_block(args.dim, args.heads, device)
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; "
        f"B={args.batch}, C={args.dim}, keys D={args.key_dim}, protected=1, fp32"
    )
    print()
    header = (
        f"{'N0':>5} {'r':>4} | {'matching ms':>11} {'merge ms':>9} {'step ms':>8} | "
        f"{'block ms':>9} | {'step/block':>10}"
    )
    print(header)
    print("-" * len(header))
    for n0, r in zip(args.sizes, rs, strict=True):
        repeats = args.repeats or (9 if n0 <= 400 else 5)
        args_n = argparse.Namespace(**{**vars(args), "repeats": repeats})
        t = bench_size(args_n, n0, r, device, block)
        print(
            f"{n0:>5} {r:>4} | {t['matching'] * 1e3:>11.2f} {t['merge'] * 1e3:>9.2f} "
            f"{t['step'] * 1e3:>8.2f} | {t['block'] * 1e3:>9.1f} | {100 * t['step'] / t['block']:>9.2f}%"
        )
    print("(medians of interleaved repetitions; step = matching + merge, timed as one call)")

    print()
    print(f"Merge history over a {args.layers}-layer chain (peak bytes held, B={args.batch}):")
    header = (
        f"{'N0':>5} {'r':>4} {'N end':>6} | {'ours MB':>8} {'plan MB':>8} | {'dense (B,N,N0) MB':>17} | ratio"
    )
    print(header)
    print("-" * len(header))
    for n0, r in zip(args.sizes, rs, strict=True):
        m = chain_memory(args.batch, n0, r, args.layers, args.key_dim, device)
        mb = 1 / 2**20
        print(
            f"{n0:>5} {r:>4} {m['final_tokens']:>6} | {m['ours'] * mb:>8.3f} {m['plan'] * mb:>8.3f} | "
            f"{m['dense'] * mb:>17.1f} | {m['dense'] / m['ours']:>5.0f}x"
        )
    print("(ours: source (B, N0) int64 + sizes (B, N) float32 carried between layers;")
    print(" plan: one layer's index tensors, freed after the layer; dense: the seed's adjacency matrix)")


if __name__ == "__main__":
    main()
