"""Fidelity of merging options at equal FLOPs on the shared DINOv2-S/14 with its saliency head.

Runs the unmerged model once over the photos (features cached), then, for every config (a
schedule and ``tome.patch`` keyword options), one table row: the FLOP-ideal speedup (FLOPs
counted from the tokens every block sees, as in ``benchmarks/speed.py``), the CLS cosine to the
unmerged model (mean and min over the photos), the patch-feature cosine after unmerge, and the
Pearson correlation of the saliency maps.

    python benchmarks/fidelity.py                       # original ToMe vs tome's defaults
    python benchmarks/fidelity.py --set ablation        # one option at a time, at ~2.0x
    python benchmarks/fidelity.py --r 16 16:-1.0 --opt metric=head_keys mode=mean
    python benchmarks/fidelity.py --set final --speed   # with measured speedups
    python benchmarks/fidelity.py --set final --overhead  # ms spent in the merge step
    python benchmarks/fidelity.py --img-size 518 --r 102 --opt metric=head_keys --overhead --limit 8

``--speed`` also times every config (batch 32, output unmerged, interleaved runs, median of
``--reps``); ``--overhead`` times only the merge step (batch 32; batch 8 above 224 px).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tome.tools.images import find_images, open_image  # noqa: E402
from tome.tools.measure.eval import pearson  # noqa: E402
from tome.tools.models.loading import load_model  # noqa: E402
from tome.tools.schedule_text import parse_r, r_label  # noqa: E402

SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "dinov2-small-saliency"
IMAGES = SHARED / "images" / "imagenet-samples"


def ramp(first: int, last: int, layers: int = 12) -> list[int]:
    """A linear per-layer schedule from ``first`` to ``last`` tokens removed."""
    return [round(first + (last - first) * i / (layers - 1)) for i in range(layers)]


# The original ToMe (Bolya et al. 2023) within tome.patch; {} is tome's defaults (mode="mlerp").
ORIGINAL = {"mode": "mean"}
# The option that helps dense outputs at equal FLOPs, at a small cost in time (see the final
# set); unmerge_detail adds little at ~2x (robustness set) and is left out.
DENSE = {"metric": "head_keys"}
# A linear ramp that measures ~2.0x on the shared DINOv2-S/14 at 224 px (FLOP-ideal 1.98x), and
# one ~1% faster in FLOPs, to pay for DENSE's extra time.
RAMP_28_4 = ramp(28, 4)
RAMP_29_4 = ramp(29, 4)
ROBUSTNESS_SCHEDULES = (
    ("[29,26,…,6,4]", [29, 26, 24, 22, 19, 17, 15, 13, 10, 8, 6, 4]),  # a schedule tune found earlier
    ("ramp 28→4", RAMP_28_4),
    ("ramp 28→3", ramp(28, 3)),
    ("ramp 27→4", ramp(27, 4)),
    ("(16,-1.0)", (16, -1.0)),
    ("r=16", 16),
    ("r=20", 20),
)

# (label, schedule, tome.patch options)
SETS: dict[str, list[tuple[str, object, dict]]] = {
    # the original algorithm against tome's defaults and the dense options, on several schedules
    "default": [
        (f"{label} {name}", r, options)
        for label, r in (("r=16", 16), ("(16,-1.0)", (16, -1.0)), ("ramp 28→4", RAMP_28_4), ("r=20", 20))
        for name, options in (("original ToMe", ORIGINAL), ("tome defaults", {}), ("+ head_keys", DENSE))
    ],
    # one option at a time, from the original algorithm, at equal FLOPs (~2.0x measured)
    "ablation": [
        ("ramp 28→4 original ToMe", RAMP_28_4, ORIGINAL),
        ("+ mode=mlerp (tome defaults)", RAMP_28_4, {}),
        ("+ metric=head_keys", RAMP_28_4, {**ORIGINAL, "metric": "head_keys"}),
        ("+ unmerge_detail", RAMP_28_4, {**ORIGINAL, "unmerge_detail": True}),
        ("+ mlerp, head_keys", RAMP_28_4, DENSE),
        ("+ mlerp, head_keys, unmerge_detail", RAMP_28_4, {**DENSE, "unmerge_detail": True}),
        ("+ mlerp, keep_outliers=4", RAMP_28_4, {"keep_outliers": 4}),
        ("tome defaults, prop_attn=False", RAMP_28_4, {"prop_attn": False}),
    ],
    # every option against the original algorithm on seven schedules (wins counted by main())
    "robustness": [
        (f"{label} | {name}", r, options)
        for label, r in ROBUSTNESS_SCHEDULES
        for name, options in (
            ("original", ORIGINAL),
            ("mlerp", {}),
            ("head_keys", {**ORIGINAL, "metric": "head_keys"}),
            ("unmerge_detail", {**ORIGINAL, "unmerge_detail": True}),
            ("mlerp+head_keys", DENSE),
            ("mlerp+head_keys+detail", {**DENSE, "unmerge_detail": True}),
        )
    ],
    # at ~2.0x measured, with timings
    "final": [
        ("(16,-1.0) original ToMe", (16, -1.0), ORIGINAL),
        ("(16,-1.0) tome defaults", (16, -1.0), {}),
        ("(16,-1.0) + head_keys", (16, -1.0), DENSE),
        ("ramp 29→4 original ToMe", RAMP_29_4, ORIGINAL),
        ("ramp 29→4 tome defaults", RAMP_29_4, {}),
        ("ramp 29→4 + head_keys", RAMP_29_4, DENSE),
        ("ramp 28→4 original ToMe", RAMP_28_4, ORIGINAL),
        ("ramp 28→4 tome defaults", RAMP_28_4, {}),
        ("ramp 28→4 + head_keys", RAMP_28_4, DENSE),
        ("(16,-0.75) original ToMe", (16, -0.75), ORIGINAL),
        ("(16,-0.75) tome defaults", (16, -0.75), {}),
        ("(16,-0.75) + head_keys", (16, -0.75), DENSE),
    ],
}


def flops(tokens: list[int], width: int = 384, hidden: int = 1536, patch: int = 14) -> float:
    """FLOPs of one image (the model of benchmarks/speed.py): ``tokens`` entering block 0 and
    left after each block."""
    total = 2 * (tokens[0] - 1) * 3 * patch**2 * width
    for n, m in itertools.pairwise(tokens):
        total += 6 * n * width * width + 4 * n * n * width + 2 * n * width * width + 4 * m * width * hidden
    return float(total)


def run(model, batches, r, options) -> dict:
    if r is None:
        model.set_r(None)
    else:
        model.set_r(r, unmerge_output=True, **options)
    pooled, patches, saliency, tokens = [], [], [], None
    for pixels in batches:
        out = model(pixels)
        pooled.append(out.pooled.float())
        patches.append(out.patches.float())
        saliency.append(out.saliency.float())
        if r is not None:
            tokens = list(model.module.tome.tokens_per_layer)
    model.set_r(None)
    return {
        "pooled": torch.cat(pooled),
        "patches": torch.cat(patches),
        "saliency": torch.cat(saliency),
        "tokens": tokens,
    }


def measure(model, configs, batch: int = 32, reps: int = 5) -> list[float]:
    """Measured speedup of every config over the unpatched model: the backbone with its output
    unmerged (as the fidelity rows ran it, so ``unmerge_detail`` costs count), random pixels,
    interleaved runs, the median of ``reps`` runs."""
    pixels = torch.randn(batch, 3, model.img_size, model.img_size, generator=torch.Generator().manual_seed(0))
    settings = [None] + [(r, options) for _, r, options in configs]
    times: list[list[float]] = [[] for _ in settings]
    for rep in range(reps + 1):
        for i, setting in enumerate(settings):
            if setting is None:
                model.set_r(None)
            else:
                model.set_r(setting[0], unmerge_output=True, **setting[1])
            start = time.perf_counter()
            model.run_backbone(pixels)
            if rep:  # the first round warms up
                times[i].append(time.perf_counter() - start)
    model.set_r(None)
    median = [statistics.median(t) for t in times]
    return [median[0] / m for m in median[1:]]


def _timed(function, spent: list[float]):
    """``function``, adding the seconds each call takes to ``spent[0]``."""

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = function(*args, **kwargs)
        spent[0] += time.perf_counter() - start
        return out

    return timed


def overhead(model, configs, batch: int = 32, reps: int = 5) -> list[tuple[float, float]]:
    """Per config: milliseconds per forward spent in the handle's merge step (matching
    features, merging, and the end-of-model unmerge with detail) and their share of the whole
    forward in percent (batch 32, 8 above 224 px; output unmerged; medians of ``reps``). Less
    noisy than whole-forward timings for comparing options."""
    if model.img_size > 224:
        batch = 8  # batch 32 at 518 px takes ~10 s per forward
    pixels = torch.randn(batch, 3, model.img_size, model.img_size, generator=torch.Generator().manual_seed(0))
    result = []
    for _, r, options in configs:
        model.set_r(r, unmerge_output=True, **options)
        handle = model.module.tome
        spent = [0.0]
        for name in ("similarity_features", "merge_layer", "end_layer"):
            setattr(handle, name, _timed(getattr(handle, name), spent))
        per_run = []
        for rep in range(reps + 1):
            spent[0] = 0.0
            start = time.perf_counter()
            model.run_backbone(pixels)
            if rep:  # the first run warms up
                per_run.append((spent[0] * 1000, 100 * spent[0] / (time.perf_counter() - start)))
        result.append((statistics.median(m for m, _ in per_run), statistics.median(p for _, p in per_run)))
        model.set_r(None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", default="default", choices=sorted(SETS))
    parser.add_argument("--r", nargs="*", help="schedules instead of a set (16, 16:-1.0, 0,8,... per layer)")
    parser.add_argument(
        "--layers", nargs="*", default=[], help="per-layer schedules, each as 12 comma-separated ints"
    )
    parser.add_argument("--opt", nargs="*", default=[], help="tome.patch options for --r/--layers: key=value")
    parser.add_argument("--limit", type=int, default=100, help="number of photos (default 100)")
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--model", default=f"hf:{MODEL}")
    parser.add_argument("--img-size", type=int, default=None, help="input size in pixels (default 224)")
    parser.add_argument("--speed", action="store_true", help="also time every config (batch 32, --reps runs)")
    parser.add_argument("--reps", type=int, default=7, help="timed runs per config for --speed")
    parser.add_argument(
        "--overhead", action="store_true", help="also time the merge step itself (ms per forward, %% of it)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, img_size=args.img_size)
    paths, _ = find_images([str(IMAGES)])
    paths = paths[: args.limit]
    pixels = model.preprocess([open_image(p) for p in paths])
    batches = pixels.split(args.batch)

    configs = SETS[args.set]
    if args.r is not None or args.layers:
        options = {}
        for item in args.opt:
            key, _, value = item.partition("=")
            options[key] = {"true": True, "false": False}.get(value.lower(), value)
            if isinstance(options[key], str):
                with contextlib.suppress(ValueError):
                    options[key] = float(value) if "." in value else int(value)
        schedules = [s for text in (args.r or []) for s in parse_r(text)]
        schedules += [[int(v) for v in text.split(",")] for text in args.layers]
        suffix = " ".join(f"{k}={v}" for k, v in options.items())
        configs = [
            (f"{r_label(s) if not isinstance(s, list) else s} {suffix}".strip(), s, options)
            for s in schedules
        ]

    start = time.perf_counter()
    ref = run(model, batches, None, {})
    base_tokens = [model.protected + model.num_patches] * (len(model.blocks) + 1)
    base_flops = flops(base_tokens, model.width)
    print(f"{model.describe()}; {len(paths)} photos; reference in {time.perf_counter() - start:.1f} s\n")
    speed = measure(model, configs, reps=args.reps) if args.speed else [None] * len(configs)
    cost = overhead(model, configs) if args.overhead else [None] * len(configs)
    print(
        "| config | tokens | FLOP-ideal | measured | merge step ms (% of forward) | CLS cos | min CLS cos | patch cos "
        "| saliency corr |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    results: dict[str, tuple[float, float]] = {}
    for (label, r, options), measured, ms in zip(configs, speed, cost, strict=True):
        out = run(model, batches, r, options)
        cls = F.cosine_similarity(out["pooled"], ref["pooled"], dim=-1)
        patch = F.cosine_similarity(out["patches"], ref["patches"], dim=-1).mean(1)
        sal = pearson(out["saliency"], ref["saliency"])
        tokens = out["tokens"]
        ideal = base_flops / flops(tokens, model.width)
        print(
            f"| {label} | {tokens[0]}→{tokens[-1]} | {ideal:.2f}x | "
            f"{'–' if measured is None else f'{measured:.2f}x'} | {'–' if ms is None else f'{ms[0]:.1f} ({ms[1]:.1f}%)'} "
            f"| {cls.mean():.4f} | {cls.min():.4f} "
            f"| {patch.mean():.4f} | {sal.mean():.4f} |",
            flush=True,
        )
        results[label] = (cls.mean().item(), sal.mean().item())
    if args.set == "robustness" and args.r is None and not args.layers:
        print_wins(results)
    print(f"\n{time.perf_counter() - start:.0f} s")


def print_wins(results: dict[str, tuple[float, float]]) -> None:
    """For every option, the mean change against the original algorithm over the schedules, and
    on how many schedules it raised the CLS cosine and the saliency correlation."""
    print("\n| option | mean ΔCLS | CLS up on | mean Δsaliency | saliency up on |\n|---|---|---|---|---|")
    names = dict.fromkeys(label.split(" | ")[1] for label in results)
    for name in names:
        if name == "original":
            continue
        deltas = [
            (results[f"{s} | {name}"][0] - results[f"{s} | original"][0],
             results[f"{s} | {name}"][1] - results[f"{s} | original"][1])
            for s, _ in ROBUSTNESS_SCHEDULES
        ]  # fmt: skip
        n = len(deltas)
        print(
            f"| {name} | {sum(d[0] for d in deltas) / n:+.4f} | {sum(d[0] > 0 for d in deltas)}/{n} "
            f"| {sum(d[1] for d in deltas) / n:+.4f} | {sum(d[1] > 0 for d in deltas)}/{n} |"
        )


if __name__ == "__main__":
    main()
