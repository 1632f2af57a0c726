"""``tome embed --ray`` where the workers write the parts: Ray's fixed start, the steady rate
against the local job's, the driver's CPU per 1,000 rows, and on a simulated 3-node cluster the
time to recover from a killed node.

Input: ``--photos`` photos (default 400): the 100 ImageNet photos of
``../shared/images/imagenet-samples`` repeated, as symlinks in a temporary folder. Model: the
default ``dinov2-s-saliency`` (DINOv2-S/14, 224 px, fp32, batch 32) at ``--r 16:-0.75``.

1. **One machine** (each run a fresh process, ``tome embed ... --json``, the runners interleaved
   over ``--rounds``, medians): the local job and ``--ray`` (a local Ray started for the job, one
   actor). Columns: end to end seconds; the fixed start: seconds from the job's start to its
   first row (loading the model, and on Ray starting Ray, the actor and its copy of the model);
   the steady rate: rows after the first batch over the time from the first row to the last (the
   model and decoding running; the start not counted), and its ratio to the local job's (target:
   ``--ray`` within 10%); the driver's CPU seconds per 1,000 rows (the process that runs
   ``tome embed``, from its first actor ready to the file written: on Ray it only hands out parts
   and writes the final file; target < 1), and apart from it the driver's fixed CPU seconds
   before (putting the model in Ray's store, starting the actors). Locally the driver is the
   worker: its CPU is the whole job's.
2. **A simulated cluster** (``ray.cluster_utils.Cluster``: a head and 2 worker nodes of 1 CPU
   each, on this machine; one actor a node; parts of ``--chunk`` rows; the steady rate summed over
   the actors, each from its own first row): the same photos, once
   whole and once with a worker node killed (SIGKILL of its Ray processes) after the first part
   is written. Columns: seconds, steady rows/s, parts retried, nodes lost; for the killed run the
   seconds from the kill until the driver noticed the lost parts, and until the last of them was
   written again (the recovery). Ray's health checks are its defaults unless ``--fast-checks``
   (a node noticed lost in ~2 s instead of Ray's default ~15-30 s).

    python benchmarks/embed_cluster.py                             # 400 photos, 3 rounds
    python benchmarks/embed_cluster.py --photos 64 --rounds 1      # a smoke run (~3 min on 2 loaded cores)

The load average is printed at the start and the end: on a machine shared with other jobs the
figures are slower, and the ratios noisier, than on an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "images" / "imagenet-samples"
SETTING = "16:-0.75"
FAST_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


def _load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def _photos(folder: Path, count: int) -> Path:
    sources = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    if not sources:
        sys.exit(f"no photos in {PHOTOS}")
    out = folder / "photos"
    out.mkdir()
    for i in range(count):
        source = sources[i % len(sources)]
        (out / f"{i:04d}_{source.name}").symlink_to(source)
    return out


def _run(photos: Path, out: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "tome.cli.main", "embed", str(photos), "--out", str(out)]
    command += ["--r", SETTING, "--batch", "32", "--json", "-q", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    summary["wall"] = time.perf_counter() - start
    return summary


def _cluster_child(photos: str, chunk: int, kill: bool, fast: bool) -> None:
    """One job on a fresh simulated 3-node cluster; prints its figures as JSON."""
    import ray
    from ray.cluster_utils import Cluster

    from tome.tools.embed.job import embed

    head = {"num_cpus": 1, "include_dashboard": False}
    if fast:
        head["_system_config"] = FAST_CHECKS
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, logging_level="ERROR")
    cluster.wait_for_nodes()
    killed: list[float] = []

    def kill_a_node(rows: int) -> None:
        if kill and not killed:
            killed.append(time.perf_counter())
            cluster.remove_node(workers[0], allow_graceful=False)

    out = Path(tempfile.mkdtemp()) / "cluster.parquet"
    try:
        start = time.perf_counter()
        result = embed(
            photos, out, r=SETTING, batch=32, chunk=chunk, ray=True, on_chunk=kill_a_node, progress=False
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
    found = {
        "seconds": result.seconds,
        "rows": result.rows,
        "steady": result.steady_items_per_s,
        "retried": result.retried,
        "lost": result.nodes_lost,
        "cpu_per_1000": 1000 * (result.driver_cpu_s - result.driver_start_cpu_s) / max(1, result.embedded),
    }
    if killed:
        at = killed[0] - start  # the kill, in the job's seconds (its start ~ ours)
        found["noticed_s"] = None if result.lost_s is None else result.lost_s - at
        found["recovered_s"] = None if result.recovered_s is None else result.recovered_s - at
    print(json.dumps(found))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--chunk", type=int, default=16, help="rows per part in the cluster runs (default: 16)"
    )
    parser.add_argument(
        "--fast-checks", action="store_true", help="cluster runs: Ray health checks every 0.5 s"
    )
    parser.add_argument("--no-cluster", action="store_true", help="only the one-machine runs")
    parser.add_argument(
        "--child", nargs=4, metavar=("PHOTOS", "CHUNK", "KILL", "FAST"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        photos, chunk, kill, fast = args.child
        _cluster_child(photos, int(chunk), kill == "1", fast == "1")
        return
    print(f"load average at the start: {_load()} ({os.cpu_count()} CPUs)", flush=True)
    runners = {"local": [], "--ray": ["--ray"]}
    results: dict[str, list[dict]] = {name: [] for name in runners}
    cluster: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photos = _photos(folder, args.photos)
        n = 0
        for round_ in range(args.rounds):
            for name, extra in runners.items():
                n += 1
                summary = _run(photos, folder / f"run{n}.parquet", extra)
                assert summary["rows"] == args.photos, summary
                results[name].append(summary)
                print(
                    f"  round {round_ + 1} {name:<6} {summary['wall']:6.1f}s, first row {summary['first_row_s']:.1f}s, "
                    f"steady {summary['steady_items_per_s']:.1f} rows/s, driver CPU {summary['driver_cpu_s']:.2f}s",
                    flush=True,
                )
        if not args.no_cluster:
            for label, kill in (("whole", "0"), ("a node killed", "1")):
                command = [sys.executable, __file__, "--child", str(photos), str(args.chunk), kill]
                command.append("1" if args.fast_checks else "0")
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
                if done.returncode != 0:
                    sys.exit(f"cluster run failed ({done.returncode}):\n{done.stderr[-3000:]}")
                cluster[label] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"  cluster, {label}: {cluster[label]}", flush=True)
    print(f"load average at the end: {_load()}")
    print()
    print(
        f"tome embed --r {SETTING}, {args.photos} photos (the shared 100 repeated), dinov2-s-saliency, 224 px, "
        f"batch 32, fp32, {os.cpu_count()} CPUs; medians of {args.rounds} interleaved rounds, each a fresh process"
    )
    print(
        "| runner | end to end s | fixed start (to the first row) s | steady rows/s | vs local | "
        "driver CPU s / 1,000 rows | driver's fixed CPU s |"
    )
    print("|---|---|---|---|---|---|---|")
    local_steady = statistics.median(r["steady_items_per_s"] for r in results["local"])
    for name, runs in results.items():
        steady = statistics.median(r["steady_items_per_s"] for r in runs)
        cpu = statistics.median(
            1000 * (r["driver_cpu_s"] - r["driver_start_cpu_s"]) / max(1, r["embedded"]) for r in runs
        )
        fixed = statistics.median(r["driver_start_cpu_s"] for r in runs)
        print(
            f"| {name} | {statistics.median(r['wall'] for r in runs):.1f} | "
            f"{statistics.median(r['first_row_s'] for r in runs):.1f} | {steady:.1f} | "
            f"{steady / local_steady:.2f}x | {cpu:.2f} | {fixed:.2f} |"
        )
    if cluster:
        checks = "0.5 s health checks" if args.fast_checks else "Ray's default health checks"
        print()
        print(
            f"Simulated cluster: 3 nodes x 1 CPU on this machine, one actor a node, parts of {args.chunk} rows, {checks}"
        )
        print(
            "| run | seconds | rows | steady rows/s | parts retried | nodes lost | noticed after s | recovered after s |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for label, found in cluster.items():
            noticed = found.get("noticed_s")
            recovered = found.get("recovered_s")
            print(
                f"| {label} | {found['seconds']:.1f} | {found['rows']} | {found['steady']:.1f} | {found['retried']} | "
                f"{len(found['lost'])} | {'-' if noticed is None else f'{noticed:.1f}'} | "
                f"{'-' if recovered is None else f'{recovered:.1f}'} |"
            )


if __name__ == "__main__":
    main()
