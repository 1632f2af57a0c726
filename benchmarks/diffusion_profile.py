"""Where the time of an SD 1.5 UNet forward goes on CPU: unpatched, tome and tomesd at one ratio.

    python benchmarks/diffusion_profile.py                 # 512 px (latents 64), ratio 0.5
    python benchmarks/diffusion_profile.py --latent 128    # 1024 px

Random weights, batch 2, fp32, one torch thread; ``torch.profiler`` over one forward of each
setting (after a warm-up), grouped by aten op, plus the time of tome's matching / merge /
unmerge steps and of the attention at the merged resolution, from a side-by-side micro
benchmark on tensors of the UNet's first level (thread CPU time, medians of 7). The top rows
say what a merge of self-attention can save at most: only the attention ops and a part of the
linear layers shrink, convolutions do not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tome  # noqa: E402
from tome.core import merge as M  # noqa: E402
from tome.core.merge2d import random2d_matching  # noqa: E402

GROUPS = {
    "convolution": ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::convolution"),
    "linear (addmm/mm)": ("aten::addmm", "aten::mm"),
    "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
}


def profile_forward(unet, inputs) -> tuple[float, dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        unet(*inputs)
    self_times = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    total = sum(self_times.values())
    grouped = {name: sum(self_times.get(k, 0.0) for k in keys) for name, keys in GROUPS.items()}
    grouped["other"] = total - sum(grouped.values())
    return total, grouped


def micro(latent: int, ratio: float, reps: int = 7) -> dict[str, float]:
    """Per-block costs at the UNet's first level (320 channels, 8 heads), batch 2, ms."""
    import tomesd.merge as tomesd_merge

    B, C, N = 2, 320, latent * latent
    r = int(N * ratio)
    x, merged = torch.randn(B, N, C), torch.randn(B, N - r, C)
    key = torch.tensor(5)
    plan = random2d_matching(x, latent, latent, 2, 2, r, key=key)
    m, u = tomesd_merge.bipartite_soft_matching_random2d(x, latent, latent, 2, 2, r, no_rand=True)
    q, qm = torch.randn(B, 8, N, C // 8), torch.randn(B, 8, N - r, C // 8)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    steps = {
        "tome matching": lambda: random2d_matching(x, latent, latent, 2, 2, r, key=key),
        "tome merge": lambda: M.merge(plan, x, "mean"),
        "tome unmerge": lambda: M.unmerge(plan.index, merged),
        "tomesd matching": lambda: tomesd_merge.bipartite_soft_matching_random2d(
            x, latent, latent, 2, 2, r, no_rand=True
        ),
        "tomesd merge": lambda: m(x),
        "tomesd unmerge": lambda: u(merged),
        "attention, all tokens": lambda: sdpa(q, q, q),
        "attention, merged tokens": lambda: sdpa(qm, qm, qm),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(reps):  # interleaved
        for name, step in steps.items():
            start = time.thread_time()
            step()
            times[name].append(time.thread_time() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args(argv)
    import tomesd
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()}")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768).eval()
    g = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(2, 4, args.latent, args.latent, generator=g),
        torch.tensor(500),
        torch.randn(2, 77, 768, generator=g),
    )
    with torch.no_grad():
        unet(*inputs)  # warm-up
    rows = {}
    for kind in ("unpatched", "tome", "tomesd"):
        tome.unpatch(unet)
        tomesd.remove_patch(unet)
        if kind == "tome":
            tome.patch(unet, ratio=args.ratio)
        elif kind == "tomesd":
            tomesd.apply_patch(unet, ratio=args.ratio)
        rows[kind] = profile_forward(unet, inputs)
    tome.unpatch(unet)
    tomesd.remove_patch(unet)
    print(
        f"\nSD 1.5 UNet (random weights), {8 * args.latent} px, batch 2, fp32, 1 thread, ratio {args.ratio:g}: "
        "profiled CPU seconds of one forward, by op group\n"
    )
    groups = [*GROUPS, "other"]
    print("| setting | total | " + " | ".join(groups) + " |")
    print("|---" * (len(groups) + 2) + "|")
    for kind, (total, grouped) in rows.items():
        cells = " | ".join(f"{grouped[g]:.2f} ({100 * grouped[g] / total:.0f}%)" for g in groups)
        print(f"| {kind} | {total:.2f} | {cells} |")
    print(
        f"\nper block at the first level ({args.latent} x {args.latent} tokens, 320 channels, batch 2), ms:\n"
    )
    print("| step | ms |")
    print("|---|---|")
    for name, ms in micro(args.latent, args.ratio).items():
        print(f"| {name} | {ms:.1f} |")
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
