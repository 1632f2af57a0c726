"""The fixed cost of a Ray job of ``tome embed --ray``'s shape on this machine, with no tome in it:
what ``tome embed --ray`` cannot go below, whatever it does.

Each run is a fresh process, as a ``tome embed --ray`` run is: it imports Ray, starts a local Ray
(``ray.init``, as ``--ray`` does), starts one actor (one CPU: the shape of tome's part writer),
hands it 13 parts of 400 rows in all, two at a time (as tome's driver does), which it returns
untouched, and stops Ray. The actor imports:

- ``nothing``: Ray's own start (a worker process for the actor);
- ``torch+transformers``: what tome's actor must import before it can hold the default model
  (DINOv2-S in Hugging Face format): ``torch`` and ``transformers``' DINOv2 module.

Columns, seconds from the process's start (medians of ``--rounds`` interleaved runs): Ray started,
the first part back from the actor (every row's cost before the model's first batch can start),
all parts done, and stopping Ray. Compare the first batch and the stop with ``tome embed``'s
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
    """The part writer's shape without a model: imports ``modules`` once, returns its parts."""

    def __init__(self, modules: list[str]) -> None:
        import importlib

        for module in modules:
            importlib.import_module(module)

    def embed_part(self, rows: list[int]) -> int:
        return len(rows)


def _child(start: float, imports: str) -> None:
    """One run; prints its timings (seconds since ``start``, the parent's clock at spawn) as JSON."""
    import logging

    import ray

    ray.init(address="local", include_dashboard=False, logging_level=logging.ERROR)
    started = time.time() - start
    actor = ray.remote(_Actor).options(num_cpus=1, max_restarts=3).remote(IMPORTS[imports])
    keys = list(range(ROWS))
    parts = [keys[i : i + BATCH] for i in range(0, ROWS, BATCH)]
    assert len(parts) == BLOCKS
    first, rows, running = None, 0, []
    for part in parts:
        running.append(actor.embed_part.remote(part))
        if len(running) < 2:
            continue
        done, running = ray.wait(running, num_returns=1)
        first = first or time.time() - start
        rows += ray.get(done[0])
    rows += sum(ray.get(running))
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
        f"A Ray job with no work ({ROWS} rows, {BLOCKS} parts, one actor), {os.cpu_count()} CPUs; "
        f"seconds from process start, medians of {args.rounds} interleaved runs, each a fresh process"
    )
    print("| the actor imports | Ray started | first part back | all parts done | stopping Ray |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {name} | {med['ray_started']:.1f} | {med['first_batch']:.1f} | {med['done']:.1f} | "
            f"{med['stop']:.1f} |"
        )


if __name__ == "__main__":
    main()
