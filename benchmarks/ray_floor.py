"""The fixed cost of a Ray Data job on this machine, with no tome in it: what ``tome embed --ray``
cannot go below, whatever it does.

Each run is a fresh process, as a ``tome embed --ray`` run is: it imports Ray, starts a local Ray
(``ray.init``, as ``--ray`` does), runs a Ray Data pipeline of 400 rows in 13 blocks through one
actor (``map_batches`` with an ``ActorPoolStrategy`` of one actor, one CPU: the shape of tome's
model stage) that does nothing with its batches, and stops Ray. The actor's constructor imports:

- ``nothing``: Ray Data's own start (its executor, its helper actors, a worker for the actor);
- ``torch+transformers``: what tome's actor must import before it can hold the default model
  (DINOv2-S in Hugging Face format): ``torch`` and ``transformers``' DINOv2 module.

Columns, seconds from the process's start (medians of ``--rounds`` interleaved runs): Ray started,
the first batch back from the actor (every row's cost before the model's first batch can start),
the pipeline done, and stopping Ray. Compare the first batch and the stop with ``tome embed``'s
own start (``first_row_s`` in ``benchmarks/embed.py``'s table, local runner): a Ray run's time is
at least the local run's plus the difference of the two starts plus the stop.

    python benchmarks/ray_floor.py               # 3 rounds: ~2 min on 2 cores
    flock /tmp/tome-bench.lock python benchmarks/ray_floor.py --rounds 5

The load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROWS, BLOCKS, BATCH = 400, 13, 32
IMPORTS = {"nothing": [], "torch+transformers": ["torch", "transformers.models.dinov2.modeling_dinov2"]}


class _Actor:
    """The model stage's shape without a model: imports ``modules`` once, passes batches on."""

    def __init__(self, modules: list[str]) -> None:
        import importlib

        for module in modules:
            importlib.import_module(module)

    def __call__(self, batch: dict) -> dict:
        return batch


def _child(start: float, imports: str) -> None:
    """One run; prints its timings (seconds since ``start``, the parent's clock at spawn) as JSON."""
    import logging

    import ray

    ray.init(address="local", include_dashboard=False, logging_level=logging.ERROR)
    started = time.time() - start
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    data = ray.data.from_items([{"key": i} for i in range(ROWS)], override_num_blocks=BLOCKS)
    data = data.map_batches(
        _Actor,
        fn_constructor_kwargs={"modules": IMPORTS[imports]},
        batch_size=BATCH,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    first, rows = None, 0
    for batch in data.iter_batches(batch_size=None):
        first = first or time.time() - start
        rows += len(batch["key"])
    done = time.time() - start
    ray.shutdown()
    stopped = time.time() - start
    assert rows == ROWS, rows
    print(json.dumps({"ray_started": started, "first_batch": first, "done": done, "stop": stopped - done}))


def _load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("START", "IMPORTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(float(args.child[0]), args.child[1])
        return
    print(f"load average at the start: {_load()} ({os.cpu_count()} CPUs)", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in IMPORTS}
    for round_ in range(args.rounds):
        for name in IMPORTS:
            command = [sys.executable, __file__, "--child", repr(time.time()), name]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            found = json.loads(done.stdout.strip().splitlines()[-1])
            results[name].append(found)
            print(f"  round {round_ + 1} {name:<20} " + ", ".join(f"{k} {v:.1f}s" for k, v in found.items()))
    print(f"load average at the end: {_load()}")
    print()
    print(
        f"A Ray Data job with no work ({ROWS} rows, {BLOCKS} blocks, one actor), {os.cpu_count()} CPUs; "
        f"seconds from process start, medians of {args.rounds} interleaved runs, each a fresh process"
    )
    print("| the actor imports | Ray started | first batch back | pipeline done | stopping Ray |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {name} | {med['ray_started']:.1f} | {med['first_batch']:.1f} | {med['done']:.1f} | "
            f"{med['stop']:.1f} |"
        )


if __name__ == "__main__":
    main()
