"""``tome.tune`` on the shared DINOv2-S/14: search on calibration photos, check on all of them.

    python benchmarks/tune_dinov2.py [--target 2.0] [--calibration 32] [--budget measured]

1. ``tome.tune`` finds a per-layer schedule for the target speedup on the first N photos (of
   which it holds out a quarter to check its own search);
2. ``tome.eval`` compares it with the ramps (16, -1.0) and (16, -0.75) on the photos tune never
   saw and on every photo (CLS, patch cosine, saliency correlation), and ``tome.bench`` times
   them (interleaved, median).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tome import tune  # noqa: E402
from tome.tools.images import find_images, open_image  # noqa: E402
from tome.tools.measure.bench import format_table as bench_table  # noqa: E402
from tome.tools.measure.bench import run_bench  # noqa: E402
from tome.tools.measure.eval import evaluate  # noqa: E402
from tome.tools.measure.eval import format_table as eval_table  # noqa: E402
from tome.tools.models.loading import DEFAULT_MODEL, load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "images" / "imagenet-samples"))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--target", type=float, default=2.0)
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--budget", choices=("measured", "flops"), default="measured")
    parser.add_argument("--max-evals", type=int, default=None, help="default: tome.tune's (24)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    model = load_model(args.model)
    paths, _ = find_images([args.images])
    result = tune(
        model,
        [open_image(p) for p in paths[: args.calibration]],
        args.target,
        budget=args.budget,
        **({} if args.max_evals is None else {"max_evals": args.max_evals}),
    )
    print(
        f"schedule {result.r_text}: {result.flops_speedup:.2f}x FLOP-ideal, measured {result.measured_speedup}"
    )
    print(
        f"calibration: CLS {result.cls_cosine:.4f}, patch {result.patch_cosine:.4f} ({result.seconds:.0f}s, "
        f"{result.evaluations} schedules scored on every image, {result.screened} dropped early); "
        f"held-out check: {result.heldout_fidelity} vs ramp {result.heldout_start_fidelity} "
        f"(search kept: {result.search_kept}); start {result.start}"
    )
    rs = [(16, -1.0), (16, -0.75), list(result.schedule)]
    unseen = paths[args.calibration :]
    print(f"\n{len(unseen)} photos tune never saw:")
    print(eval_table(evaluate(model, lambda i: open_image(unseen[i]), len(unseen), rs)))
    print(f"\nall {len(paths)} photos:")
    rows = evaluate(model, lambda i: open_image(paths[i]), len(paths), rs)
    print(eval_table(rows))
    bench = run_bench(model, rs, batch=32, reps=args.reps)
    print(bench_table(bench, per_layer=False))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "tune": result.to_dict(),
                    "eval": [row.__dict__ for row in rows],
                    "bench": [row.__dict__ for row in bench],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
