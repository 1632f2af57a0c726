"""Training-step speed of token merging, next to its inference speed, in one run.

ViT-S/14 (timm ``vit_small_patch14_dinov2``, ``img_size=224``: 257 tokens, ``num_classes=100``,
``pretrained=False``: random weights, seeded; speed does not depend on them), fp32, batch 32,
224 px, unpatched and patched with ``tome.patch`` at r = 16 and (16, -1.0). Every setting has
its own copy of the same initial model and its own AdamW optimizer (lr 1e-4, weight decay 0.05).

- train step: ``model.train()``, zero the gradients, forward, cross-entropy against random
  labels (fixed, seeded), backward, ``optimizer.step()``; the whole step is timed.
- inference: the same model, ``model.eval()`` under ``torch.no_grad()``, one forward of the
  same batch.

Inputs are random pixels (fixed, seeded): speed does not depend on them. After ``--warmup``
untimed train steps and inference passes of every setting, each of ``--reps`` repetitions runs
one train step of every setting in turn, then one inference pass of every setting in turn
(interleaved, so drifts in the machine's speed hit all settings alike); the table shows medians.

Columns: train step s (median seconds of one step of the whole batch); train speedup and
inference speedup (over the unpatched model, from the medians); FLOP-ideal: forward FLOPs of the
unpatched model / with merging, counted from the tokens each block saw
(``model.tome.tokens_per_layer``) by ``tome.tools.measure.bench.flops_per_image`` (patch embedding and
blocks; a multiply-add is 2 FLOPs).

    python benchmarks/training.py               # batch 32, 5 reps after 2 warm-ups: ~2.5 min on 2 idle cores
    python benchmarks/training.py --batch 4 --reps 1 --warmup 1   # a smoke run
    python benchmarks/training.py --clock cpu   # on a shared machine (see below)

``--clock cpu`` times the CPU seconds of the calling thread (``time.thread_time``) with one torch
thread (autograd runs a CPU backward on the calling thread too): on a machine shared with other
jobs, wall-clock medians of a 2-thread run swing by 2x or more (a thread that waits for a
descheduled peer stalls the step); one thread's CPU time does much less (it still feels the
caches other jobs share).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tome  # noqa: E402
from tome.tools.measure.bench import flops_per_image  # noqa: E402

SIZE = 224
NUM_CLASSES = 100
# The timer: wall clock, or (``--clock cpu``) the CPU seconds of the calling thread.
CLOCK = time.perf_counter
# (label, r): None is the unpatched model.
SCHEDULES = [("unpatched", None), ("16", 16), ("(16, -1.0)", (16, -1.0))]


class Setting:
    """One schedule: its own model copy and optimizer, and its timings."""

    def __init__(self, label: str, r, base: nn.Module) -> None:
        self.label, self.r = label, r
        self.model = copy.deepcopy(base)
        if r is not None:
            tome.patch(self.model, r=r)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05)
        self.train_times: list[float] = []
        self.infer_times: list[float] = []
        self.tokens: list[int] = []
        self.loss = float("nan")

    def train_step(self, pixels: torch.Tensor, labels: torch.Tensor) -> float:
        self.model.train()
        start = CLOCK()
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(pixels), labels)
        loss.backward()
        self.optimizer.step()
        seconds = CLOCK() - start
        self.loss = loss.item()
        return seconds

    def inference(self, pixels: torch.Tensor) -> float:
        self.model.eval()
        with torch.no_grad():
            start = CLOCK()
            self.model(pixels)
            seconds = CLOCK() - start
        if self.r is not None:
            self.tokens = list(self.model.tome.tokens_per_layer)
        else:
            n0 = self.model.patch_embed.num_patches + self.model.num_prefix_tokens
            self.tokens = [n0] * (len(self.model.blocks) + 1)
        return seconds

    def flops(self) -> float:
        """Forward FLOPs of one image (patch embedding and blocks), from the token counts."""
        m = self.model
        counter = SimpleNamespace(
            blocks=list(m.blocks),
            width=m.embed_dim,
            num_patches=m.patch_embed.num_patches,
            patch_size=m.patch_embed.patch_size[0],
        )
        return flops_per_image(counter, self.tokens)


def load_text(load_start: float) -> str:
    """The machine's 1-minute load average at the start and at the end: other jobs' share of the
    CPUs (with 2 cores, wall-clock timings of 2-thread runs are unreliable above ~2.5)."""
    return f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} CPUs)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per setting (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per setting first (default 2)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: CPU seconds of the calling thread (time.thread_time), with 1 torch thread",
    )
    args = parser.parse_args()
    if args.reps < 1 or args.batch < 1:
        parser.error("--reps and --batch: expected at least 1")
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.thread_time
        torch.set_num_threads(1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    import timm

    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    base = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=SIZE, num_classes=NUM_CLASSES
    )
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=generator)
    settings = [Setting(label, r, base) for label, r in SCHEDULES]

    for _ in range(args.warmup):
        for s in settings:
            s.train_step(pixels, labels)
            s.inference(pixels)
    for rep in range(args.reps):
        for s in settings:
            s.train_times.append(s.train_step(pixels, labels))
        for s in settings:
            s.infer_times.append(s.inference(pixels))
        log(
            f"  rep {rep + 1}/{args.reps}: "
            + ", ".join(
                f"{s.label} train {s.train_times[-1]:.2f}s eval {s.infer_times[-1]:.2f}s" for s in settings
            )
        )

    base_train = statistics.median(settings[0].train_times)
    base_infer = statistics.median(settings[0].infer_times)
    base_flops = settings[0].flops()
    seconds = "s" if args.clock == "wall" else "CPU s"
    print(
        f"ViT-S/14 (timm vit_small_patch14_dinov2, random weights) {SIZE} px, batch {args.batch}, fp32, "
        f"AdamW; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; medians "
        f"of {args.reps} interleaved repetitions after {args.warmup} warm-up\n"
    )
    print(f"| schedule | train step {seconds} | train speedup | inference speedup | FLOP-ideal |")
    print("|---|---|---|---|---|")
    for s in settings:
        train = statistics.median(s.train_times)
        infer = statistics.median(s.infer_times)
        print(
            f"| {s.label} | {train:.2f} | {base_train / train:.2f}x | {base_infer / infer:.2f}x | "
            f"{base_flops / s.flops():.2f}x |"
        )
    print(
        "\ntokens entering block 0 -> left after the last block: "
        + ", ".join(f"{s.label} {s.tokens[0]}→{s.tokens[-1]}" for s in settings)
    )
    print(
        f"unpatched: train {args.batch / base_train:.1f} images/{seconds}, inference "
        f"{args.batch / base_infer:.1f} images/{seconds}; {time.perf_counter() - start:.0f} s in all; "
        f"{load_text(load_start)}"
    )


if __name__ == "__main__":
    main()
