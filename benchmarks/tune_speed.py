"""How long ``tome.tune`` takes, and how faithful the schedule it picks is on photos it never saw.

    python benchmarks/tune_speed.py [--calibration 16] [--target 1.5] [--budget flops]
                                    [--threads N] [--skip-before] [--also '[26,25,...]']

The natural call of issue 27: ``tome.tune(Dinov2Model (the shared DINOv2-S/14), 16 photos at
224 px, target_speedup=1.5, budget="flops")``, run twice on the same photos:

- **before**: ``tome.tune`` as it was before issue 27 (``tome/tools/tune/search.py`` at commit
  ``BEFORE``, read with ``git show``; its defaults: every candidate scored on every calibration
  photo, 120 passes for the local search);
- **after**: ``tome.tune`` as it is now, with its defaults (candidates raced: scored on a few
  photos first, dropped as soon as they do no better than the best so far; a move kept only
  when its gain is significant; 24 passes in all).

Then each schedule (and any given with ``--also``) is scored on the photos tune never saw (the
shared folder has 100: the first ``--calibration`` tune on, the rest are unseen): mean CLS cosine
and patch cosine (after unmerge) to the unmerged model, and their sum, tune's objective.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tome  # noqa: E402
from tome.tools.images import IMAGENET_MEAN, IMAGENET_STD, find_images, normalize, open_image, to_unit  # noqa: E402
from tome.tools.models.vision import from_module  # noqa: E402
from tome.tools.schedule_text import parse_r  # noqa: E402

SHARED = ROOT.parent / "shared"
BEFORE = "c900dfc2068d363b0267af14620a710ad0464396"  # the last commit of the search before issue 27


def tune_before(commit: str):
    """``tune`` of ``tome/tools/tune/search.py`` at ``commit`` (read with ``git show``)."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(
        ["git", "show", f"{commit}:tome/tools/tune/search.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    folder = Path(tempfile.mkdtemp())
    (folder / "tune_before.py").write_text(source)
    spec = importlib.util.spec_from_file_location("tune_before", folder / "tune_before.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tune_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.tune


def pixels_of(paths: list[Path], size: int) -> torch.Tensor:
    """Resize to ``size`` x ``size``, ImageNet mean and std (the shared model's preprocessing)."""
    return normalize(to_unit([open_image(p) for p in paths], size, None), IMAGENET_MEAN, IMAGENET_STD)


@torch.inference_mode()
def fidelity(model, pixels: torch.Tensor, schedules: dict[str, list[int]], batch: int = 16) -> dict:
    """Mean CLS cosine, patch cosine (after unmerge) and their sum for each schedule."""
    wrapper = from_module(model, img_size=pixels.shape[-1])

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        outs = [wrapper(pixels[i : i + batch], saliency=False) for i in range(0, len(pixels), batch)]
        return torch.cat([o.pooled for o in outs]), torch.cat([o.patches for o in outs])

    ref_cls, ref_patches = outputs()
    scores = {}
    try:
        for name, schedule in schedules.items():
            wrapper.set_r(list(schedule))
            cls, patches = outputs()
            c = torch.nn.functional.cosine_similarity(cls, ref_cls, dim=-1).mean().item()
            p = torch.nn.functional.cosine_similarity(patches, ref_patches, dim=-1).mean().item()
            scores[name] = {"cls": c, "patch": p, "objective": c + p}
    finally:
        wrapper.set_r(None)
    return scores


def images_run(result) -> int:
    """Merged forward passes of one photo the search and the held-out check ran (what tune's
    time is made of; the unmerged references and timing runs excluded). The search before issue
    27 scored every schedule on every photo, and checked two schedules (one when the search
    ended where it started)."""
    if getattr(result, "images_run", 0):
        return result.images_run
    checked = 1 if result.searched_schedule == result.start_schedule else 2
    return result.evaluations * result.images + checked * result.heldout_images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", default=str(SHARED / "images" / "imagenet-samples"))
    parser.add_argument("--model", default=str(SHARED / "models" / "dinov2-small-saliency"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calibration", type=int, default=16, help="photos given to tune (default: 16)")
    parser.add_argument("--target", type=float, default=1.5)
    parser.add_argument("--budget", choices=("flops", "measured"), default="flops")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--skip-before", action="store_true", help="time only the current defaults")
    parser.add_argument("--before", default=BEFORE, metavar="COMMIT", help="the commit of 'before'")
    parser.add_argument("--also", action="append", default=[], metavar="R", help="another schedule to score")
    parser.add_argument(
        "--score",
        choices=("unseen", "all"),
        default="unseen",
        help="score on the photos tune never saw, or all",
    )
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    model = transformers.Dinov2Model.from_pretrained(args.model).eval()
    paths, _ = find_images([args.images])
    tuned, unseen = paths[: args.calibration], paths[args.calibration :]
    pixels = pixels_of(tuned, args.size)
    print(
        f"Dinov2Model {args.model}, {args.size}px, {torch.get_num_threads()} threads; tune on "
        f"{len(tuned)} photos, target {args.target:g}x ({args.budget}); {len(unseen)} unseen photos"
    )
    runs = {} if args.skip_before else {"before": tune_before(args.before)}
    runs["after"] = tome.tune
    results, schedules = {}, {}
    for name, tune in runs.items():
        start, cpu = time.perf_counter(), time.process_time()
        result = tune(model, pixels, args.target, budget=args.budget)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        runs_of_one = images_run(result)
        results[name] = {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "image_passes": runs_of_one,
            **result.to_dict(),
        }
        schedules[name] = result.schedule
        print(
            f"{name}: {seconds:.1f}s ({cpu:.1f}s CPU), {runs_of_one} merged passes of one photo, "
            f"{result.evaluations} full evaluations + "
            f"{getattr(result, 'screened', 0)} dropped early, {result.r_text}, {result.flops_speedup:.3f}x FLOP-ideal, objective on "
            f"the calibration photos {result.fidelity:.5f} (start {result.start})",
            flush=True,
        )
    for text in args.also:
        (value,) = parse_r(text)
        schedules[text] = value
    scored = unseen if args.score == "unseen" else paths
    table = fidelity(model, pixels_of(scored, args.size), schedules) if scored else {}
    if table:
        what = f"{len(scored)} unseen" if args.score == "unseen" else f"all {len(scored)}"
        print(f"\n| schedule | FLOP-ideal | CLS cos. ({what}) | patch cos. | objective |")
        print("|---|---|---|---|---|")
        from tome.tools.tune.search import schedule_flops

        wrapper = from_module(model, img_size=args.size)
        base = schedule_flops(wrapper, [0] * len(wrapper.blocks))
        for name, schedule in schedules.items():
            s = table[name]
            label = name if name in runs else "given"
            speed = base / schedule_flops(wrapper, tome.resolve_schedule(schedule, len(wrapper.blocks)))
            print(
                f"| {label} `{'[' + ','.join(map(str, tome.resolve_schedule(schedule, len(wrapper.blocks)))) + ']'}` "
                f"| {speed:.3f}x | {s['cls']:.5f} | {s['patch']:.5f} | {s['objective']:.5f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"tune": results, "unseen": table}, indent=2))


if __name__ == "__main__":
    main()
