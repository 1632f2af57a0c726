"""How long ``tome.tune`` takes, at 2 threads and at 1, and how faithful the schedule it picks is
on photos it never saw.

    python benchmarks/tune_speed.py [--threads 2,1] [--runs fixed,auto] [--calibration 16]
                                    [--target 1.5] [--budget flops] [--also '[26,25,...]']

The natural call of issue 27: ``tome.tune(Dinov2Model (the shared DINOv2-S/14), 16 photos at
224 px, target_speedup=1.5, budget="flops")``, run on the same photos at each torch thread count
of ``--threads`` (``torch.set_num_threads`` before the call, as a user's program would), as each
of ``--runs``:

- **before**: ``tome.tune`` as it was before issue 27 (``tome/tools/tune/search.py`` at commit
  ``BEFORE``, read with ``git show``; its defaults: every candidate scored on every calibration
  photo, 120 passes for the local search);
- **fixed**: ``tome.tune(..., threads=<torch's count>)``: today's search (races, significant
  moves, 24 passes) with every pass at torch's thread count, as it ran before issue 27 item 4;
- **auto**: ``tome.tune`` with its defaults (``threads="auto"``: each pass at torch's count or
  at 1, whichever ran a FLOP faster lately; :mod:`tome.tools.tune.threads`).

At 1 thread ``fixed`` and ``auto`` are the same run (one count to pick from): only ``auto`` runs.
The count of merged passes (one photo through the patched model) is the search's work; wall time
on a machine loaded by other jobs varies several-fold from run to run. Then each schedule found
(and any given with ``--also``) is scored on the photos tune never saw (the shared folder has
100: the first ``--calibration`` tune on, the rest are unseen): mean CLS cosine and patch cosine
(after unmerge) to the unmerged model, and their sum, tune's objective.
"""

from __future__ import annotations

import argparse
import json
import os
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


def where_time_went(profile, top: int) -> list[str]:
    """Lines from a ``cProfile.Profile`` of one tune call: the forward passes (their count and
    mean batch), the FLOP model, the rest (the search's Python), then the ``top`` functions by
    their own time (torch's ops appear as the builtins that run them)."""
    import pstats

    stats = pstats.Stats(profile).stats
    total = max((ct for (f, _, name), (_, _, _, ct, _) in stats.items() if name == "tune"), default=0.0)

    def of(file_end: str, name: str) -> tuple[int, float]:
        calls, seconds = 0, 0.0
        for (file, _, func), (_, nc, _, ct, _) in stats.items():
            if func == name and file.replace("\\", "/").endswith(file_end):
                calls, seconds = calls + nc, seconds + ct
        return calls, seconds

    runs, forward = of("tune/threads.py", "run")
    if not runs:  # a tune without the thread picker: its scorer's batches
        runs, forward = of("tune/scoring.py", "_outputs")
    flop_calls, flop = of("tune/budget.py", "__call__")
    lines = [
        f"  of {total:.1f} s in tune: forward passes {forward:.1f} s ({forward / max(total, 1e-9):.0%}, "
        f"{runs} calls of the model), the FLOP model {flop:.2f} s ({flop_calls} schedules counted), "
        f"the rest {total - forward - flop:.2f} s"
    ]
    own = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    for (file, line, func), (_, nc, tt, _, _) in own:
        lines.append(f"  {tt:7.2f} s own  {nc:6d} calls  {func} ({Path(file).name}:{line})")
    return lines


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
    parser.add_argument(
        "--threads", default="2,1", help="torch thread counts to run tune at, in order (default: 2,1)"
    )
    parser.add_argument(
        "--runs",
        default="fixed,auto",
        help="which tunes to run at each count: before, fixed, auto (default: fixed,auto)",
    )
    parser.add_argument("--skip-before", action="store_true", help="the same as --runs auto")
    parser.add_argument("--before", default=BEFORE, metavar="COMMIT", help="the commit of 'before'")
    parser.add_argument("--also", action="append", default=[], metavar="R", help="another schedule to score")
    parser.add_argument(
        "--score",
        choices=("unseen", "all"),
        default="unseen",
        help="score on the photos tune never saw, or all",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="profile each tune call (cProfile): where its time went, and the N functions with the most own time",
    )
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    import transformers

    counts = [int(n) for n in args.threads.split(",")]
    kinds = ["auto"] if args.skip_before else args.runs.split(",")
    if not set(kinds) <= {"before", "fixed", "auto"}:
        parser.error(f"--runs: expected before, fixed or auto, got {args.runs!r}")
    model = transformers.Dinov2Model.from_pretrained(args.model).eval()
    paths, _ = find_images([args.images])
    tuned, unseen = paths[: args.calibration], paths[args.calibration :]
    pixels = pixels_of(tuned, args.size)
    print(
        f"Dinov2Model {args.model}, {args.size}px; tune on {len(tuned)} photos, target "
        f"{args.target:g}x ({args.budget}); {len(unseen)} unseen photos; torch threads {counts}"
    )
    before = tune_before(args.before) if "before" in kinds else None
    results, schedules, rows, found_by = {}, {}, [], {}
    for count in counts:
        torch.set_num_threads(count)
        for kind in kinds:
            if kind == "fixed" and count == 1:
                continue  # the same run as auto: one count to pick from
            if kind == "before":
                call = lambda: before(model, pixels, args.target, budget=args.budget)  # noqa: E731
            else:
                threads = count if kind == "fixed" else "auto"
                call = lambda threads=threads: tome.tune(  # noqa: E731
                    model, pixels, args.target, budget=args.budget, threads=threads
                )
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            start, cpu = time.perf_counter(), time.process_time()
            profile = None
            if args.profile:
                import cProfile

                profile = cProfile.Profile()
                result = profile.runcall(call)
            else:
                result = call()
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            name = f"{kind}, {count} thread{'s' if count > 1 else ''}"
            passes = images_run(result)
            results[name] = {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "image_passes": passes,
                "load_before": load,
                **result.to_dict(),
            }
            schedules.setdefault(result.r_text, result.schedule)
            found_by.setdefault(result.r_text, []).append(name)
            ran = getattr(result, "threads", "") or f"{count} (fixed)"
            rows.append(
                f"| {kind} | {count} | {load:.1f} | {seconds:.1f} s | {cpu:.1f} s | {passes:,} | "
                f"{ran} | `{result.r_text}` | {result.fidelity:.5f} |"
            )
            print(
                f"{name}: {seconds:.1f}s ({cpu:.1f}s CPU), {passes} merged passes of one photo, "
                f"{result.evaluations} full evaluations + {getattr(result, 'screened', 0)} dropped early, "
                f"passes at {ran}; {result.r_text}, {result.flops_speedup:.3f}x FLOP-ideal, objective on "
                f"the calibration photos {result.fidelity:.5f} (start {result.start})",
                flush=True,
            )
            if profile is not None:
                print("\n".join(where_time_went(profile, args.profile)), flush=True)
    print(
        "\n| run | torch threads | load avg. (1 min) | wall | CPU | merged passes | passes ran at | schedule | objective (calibration) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    for text in args.also:
        (value,) = parse_r(text)
        schedules[text] = value
    scored = unseen if args.score == "unseen" else paths
    torch.set_num_threads(counts[-1])
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
            label = "given" if name in args.also else "found by " + "; ".join(found_by[name])
            speed = base / schedule_flops(wrapper, tome.resolve_schedule(schedule, len(wrapper.blocks)))
            print(
                f"| {label} `{'[' + ','.join(map(str, tome.resolve_schedule(schedule, len(wrapper.blocks)))) + ']'}` "
                f"| {speed:.3f}x | {s['cls']:.5f} | {s['patch']:.5f} | {s['objective']:.5f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"tune": results, "unseen": table}, indent=2))


if __name__ == "__main__":
    main()
