"""``tome demo``: viz, a short bench and eval on the bundled photos."""

from __future__ import annotations

import time

from tome.cli.bench import measure
from tome.cli.common import load, plot_file, writable_dir
from tome.cli.eval import fidelity
from tome.cli.flags import EPILOG_MODELS, add_command, add_model_args, add_schedule_args, parse_r, settings
from tome.cli.viz import draw_pictures

_HELP = "viz, a short bench and eval on bundled photos"
_DESCRIPTION = (
    "Pictures of the merged groups for three bundled photos, a short throughput "
    "benchmark and a fidelity check; prints where the PNGs are. Offline, a minute or two on 2 cores."
)
_EXAMPLES = """\
  tome demo
  tome demo --out /tmp/demo --r 13
"""


def add_parser(subparsers) -> None:
    demo = add_command(subparsers, "demo", _HELP, _DESCRIPTION, _EXAMPLES, EPILOG_MODELS)
    demo.add_argument(
        "--out", default="tome-demo", metavar="DIR", help="output folder (default: ./tome-demo)"
    )
    add_schedule_args(demo, "16", " (the pictures; bench and eval compare r=8 and 16)")
    demo.add_argument("--bench-batch", type=int, default=8, metavar="B", help="bench batch size (default: 8)")
    demo.add_argument("--reps", type=int, default=3, help="bench repetitions (default: 3)")
    add_model_args(demo)
    demo.set_defaults(func=run)


def run(args) -> int:
    from tome.tools.data import demo_images
    from tome.tools.schedule_text import setting_label

    rs = settings(args, single=True)
    out = writable_dir(args.out).absolute()
    photos = demo_images()
    # what viz, bench and eval read of their own flags (speed_reps: the bench times the same model)
    vars(args).update(
        batch=len(photos), no_outlines=False, average="color", no_titles=False, scale=1,
        plot=str(out / "bench.png"), knn_k=20, speed_reps=0,
    )  # fmt: skip
    plot = plot_file(args.plot)
    model = load(args, describe=False)  # the demo's header describes it
    start = time.perf_counter()

    print(f"== tome demo: {model.describe()}")
    print(f"   writing into {out}/ (--out DIR to choose)")
    written = draw_pictures(model, photos, rs, out, args)
    print(f"\n== viz ({setting_label(rs[0])}): what was merged, one PNG per photo")
    for path in written:
        print(f"  {path}")

    bench_rs = parse_r("0,8,16")
    _, caption, table, _ = measure(
        model, bench_rs, args, batch=args.bench_batch, reps=args.reps, warmup=1, plot=plot
    )
    print(f"\n== bench: {caption}")
    print(table)
    print(f"  plot: {args.plot}")

    _, caption, table, _ = fidelity(model, photos, None, parse_r("8,16"), args, batch=len(photos))
    print(f"\n== eval: {caption}")
    print(table)
    print(f"\ndone in {time.perf_counter() - start:.0f}s; pictures in {out}/")
    return 0
