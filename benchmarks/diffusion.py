"""Speed of token merging on a Stable Diffusion 1.5 UNet: unpatched, tome and tomesd side by side.

One command, one process; prints a markdown table::

    python benchmarks/diffusion.py                      # 512 px (latents 64), batch 2, 3 reps
    python benchmarks/diffusion.py --latent 128 --reps 5   # 1024 px
    python benchmarks/diffusion.py --latent 32 --reps 2    # a smoke run
    python benchmarks/diffusion.py --clock cpu             # on a shared machine (see below)

The UNet is diffusers' ``UNet2DConditionModel`` with SD 1.5's layout (its default config,
``cross_attention_dim=768``) and random weights: speed does not depend on them. Inputs: random
latents, a timestep, random text states (77 tokens), fp32 on CPU, no gradients.

Every repetition times each setting once, in turn (unpatched; tome at each ratio; tomesd at each
ratio), so slow drifts of the machine hit all alike; the table shows medians of the UNet forward.
Both libraries run with tomesd's defaults (``max_downsample=1, sx=sy=2, use_rand=True``,
self-attention merged only) at the same ratio.

``--clock cpu`` times the CPU seconds of the calling thread (``time.thread_time``) with one torch
thread: on a machine shared with other jobs, wall-clock medians swing by 2x; CPU time of a
single thread does much less (it still feels the caches other jobs share).

Columns:

- s/forward: median seconds of one UNet forward; speedup: unpatched / patched;
- match %: share of tome's forward spent in its matching (``random2d_matching``), timed (same
  clock) by a wrapper around it during the timed forwards;
- rel. L2: ``||y - y0|| / ||y0||`` of the UNet output against the unpatched output ``y0``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tome  # noqa: E402

# (``tome.patch`` is the function: the adapter module by its full name)
tome_diffusers = importlib.import_module("tome.patch.diffusers")


def build_unet(seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(cross_attention_dim=768).eval()  # SD 1.5's layout


def set_state(unet: torch.nn.Module, kind: str, ratio: float) -> None:
    import tomesd

    tome.unpatch(unet)
    tomesd.remove_patch(unet)
    if kind == "tome":
        tome.patch(unet, ratio=ratio)
    elif kind == "tomesd":
        tomesd.apply_patch(unet, ratio=ratio)


CLOCK = time.perf_counter


def forward(unet: torch.nn.Module, inputs: tuple) -> tuple[float, torch.Tensor]:
    start = CLOCK()
    with torch.no_grad():
        out = unet(*inputs).sample
    return CLOCK() - start, out


@contextlib.contextmanager
def timed_matching(total: list[float]) -> Iterator[None]:
    original = tome_diffusers.random2d_matching

    def wrapper(*args, **kwargs):
        start = CLOCK()
        try:
            return original(*args, **kwargs)
        finally:
            total[0] += CLOCK() - start

    tome_diffusers.random2d_matching = wrapper
    try:
        yield
    finally:
        tome_diffusers.random2d_matching = original


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent size (image size / 8); default 64")
    parser.add_argument("--batch", type=int, default=2, help="batch (a CFG pair: 2)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of every setting")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: this thread's CPU time, 1 torch thread"
    )
    args = parser.parse_args(argv)
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.thread_time
        torch.set_num_threads(1)
    elif args.threads:
        torch.set_num_threads(args.threads)

    unet = build_unet()
    g = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(args.batch, 4, args.latent, args.latent, generator=g),
        torch.tensor(500),
        torch.randn(args.batch, 77, 768, generator=g),
    )
    settings = [("unpatched", 0.0)] + [(k, r) for k in ("tome", "tomesd") for r in args.ratios]
    times: dict[tuple[str, float], list[float]] = {s: [] for s in settings}
    outputs: dict[tuple[str, float], torch.Tensor] = {}
    matching: dict[float, list[float]] = {r: [] for r in args.ratios}
    forward(unet, inputs)  # warm-up
    for _ in range(args.reps):
        for setting in settings:
            set_state(unet, *setting)
            total = [0.0]
            with timed_matching(total):
                elapsed, outputs[setting] = forward(unet, inputs)
            times[setting].append(elapsed)
            if setting[0] == "tome":
                matching[setting[1]].append(total[0] / elapsed)
    set_state(unet, "unpatched", 0.0)

    base = statistics.median(times[settings[0]])
    reference = outputs[settings[0]]
    px = args.latent * 8
    print(
        f"SD 1.5 UNet (random weights), {px} px (latents {args.latent}), batch {args.batch}, fp32 CPU, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, median of {args.reps}\n"
    )
    print("| setting | ratio | s/forward | speedup | match % | rel. L2 vs unpatched |")
    print("|---|---|---|---|---|---|")
    for setting in settings:
        kind, ratio = setting
        median = statistics.median(times[setting])
        change = ((outputs[setting] - reference).norm() / reference.norm()).item()
        share = f"{100 * statistics.median(matching[ratio]):.1f}" if kind == "tome" else ""
        label = "" if kind == "unpatched" else f"{ratio:g}"
        print(f"| {kind} | {label} | {median:.3f} | {base / median:.2f}x | {share} | {change:.4f} |")
    for ratio in args.ratios:
        ours, theirs = statistics.median(times[("tome", ratio)]), statistics.median(times[("tomesd", ratio)])
        print(f"\nratio {ratio:g}: tome / tomesd throughput = {theirs / ours:.2f}x", end="")
    print()


if __name__ == "__main__":
    main()
