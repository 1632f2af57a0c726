"""``tome embed`` end to end: images/s from process start to file closed, local and on Ray.

Input: ``--photos`` photos (default 400): the 100 ImageNet photos of
``../shared/images/imagenet-samples`` (JPEG, ~500x375) repeated, as symlinks in a temporary
folder (each one decoded, resized and embedded as its own row). Model: the default
``dinov2-s-saliency`` (DINOv2-S/14, 224 px, fp32, batch 32; its pooled CLS feature).

Every run is a fresh process, ``python -m tome.cli.main embed PHOTOS --out NEW.parquet --json
-q ...``, timed from start to exit (imports, model loading, decoding, the model, writing): what
a user waits for. The settings are interleaved: each round runs every configuration once, in
turn; the table shows medians over ``--rounds``. Columns: images/s end to end; speedup over
r=0 of the same runner; the process's seconds; of them, seconds outside the job (Python's start,
the imports before the job, the exit); and from the job's own timers: seconds loading the model
(``load_s``), seconds from the job's start until its first row was done (``first_row_s``: the
fixed start, the model and on Ray starting Ray and the actors), seconds stopping Ray
(``stop_s``), seconds decoding + resizing (summed over the decoding threads, or Ray tasks),
seconds in the model, decoding's share of the two, and (local runs) seconds the model waited for
decoded images (``wait``: when it is large the input pipeline, not the model, bounds the
speed). ``benchmarks/ray_floor.py`` measures Ray's own fixed cost, with no tome in the job;
``benchmarks/embed_cluster.py`` the steady rate after the start, the driver's CPU and a lost node.

``--ray`` runs start a local Ray for the job and stop it (``tome embed --ray``; ``--ray-workers``
compares numbers of decoding threads in the actor, ``tome embed --workers``); with
``--cluster`` the script also starts one local Ray cluster (``ray start --head``) before the
rounds and adds runs that connect to it (``--ray-address``), which is how a cluster is used:
no Ray start in the job's time.

    flock /tmp/tome-bench.lock python benchmarks/embed.py --cluster --rounds 2   # docs/embed.md's: 11 min on 2 cores
    flock /tmp/tome-bench.lock python benchmarks/embed.py               # 3 rounds, no cluster runs
    flock /tmp/tome-bench.lock python benchmarks/embed.py --settings 16:-0.75 --ray-workers 1,2,4
    python benchmarks/embed.py --photos 64 --rounds 1 --no-ray          # a smoke run

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
RAY = str(Path(sys.executable).with_name("ray"))  # the ray command of this Python's environment


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


def _run(photos: Path, out: Path, setting: str, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "tome.cli.main", "embed", str(photos), "--out", str(out)]
    command += ["--r", setting, "--batch", "32", "--json", "-q", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    summary["wall"] = wall
    summary["outside"] = wall - summary["seconds"]  # Python's start, the imports before the job, exit
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", default="0,16:-0.75", help="--r settings, ';'-separated... or commas")
    parser.add_argument("--no-ray", action="store_true", help="local runs only")
    parser.add_argument("--cluster", action="store_true", help="also runs on a running local Ray cluster")
    parser.add_argument(
        "--ray-workers",
        default="",
        metavar="N,N",
        help="--ray runs with each of these --workers (decoding threads in each actor) instead of the default",
    )
    args = parser.parse_args()

    settings = [s.strip() for s in args.settings.split(",")]
    runners: list[tuple[str, list[str]]] = [("local", [])]
    if not args.no_ray and args.ray_workers:
        for n in args.ray_workers.split(","):
            runners.append((f"--ray --workers {int(n)}", ["--ray", "--workers", str(int(n))]))
    elif not args.no_ray:
        runners.append(("--ray", ["--ray"]))
    cluster = None
    if args.cluster:
        cluster = subprocess.run(
            [RAY, "start", "--head", f"--num-cpus={os.cpu_count()}", "--include-dashboard=false"],
            capture_output=True,
            text=True,
        )
        if cluster.returncode != 0:
            sys.exit(f"ray start failed:\n{cluster.stderr[-2000:]}")
        runners.append(("--ray-address auto", ["--ray-address", "auto"]))
    print(f"load average at the start: {_load()} ({os.cpu_count()} CPUs)", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            photos = _photos(folder, args.photos)
            n = 0
            for round_ in range(args.rounds):
                for runner, extra in runners:
                    for setting in settings:
                        n += 1
                        summary = _run(photos, folder / f"run{n}.parquet", setting, extra)
                        assert summary["rows"] == args.photos, summary
                        results.setdefault((runner, setting), []).append(summary)
                        print(
                            f"  round {round_ + 1} {runner:<18} r={setting:<9} {summary['wall']:6.1f}s "
                            f"(load {summary['load_s']:.1f}s, first row {summary['first_row_s']:.1f}s, decode {summary['decode_s']:.1f}s, "
                            f"model {summary['model_s']:.1f}s)",
                            flush=True,
                        )
    finally:
        if cluster is not None:
            subprocess.run([RAY, "stop"], capture_output=True)
    print(f"load average at the end: {_load()}")
    print()
    print(
        f"tome embed, {args.photos} photos (the shared 100 repeated), default model dinov2-s-saliency, "
        f"224 px, batch 32, fp32, {os.cpu_count()} CPUs; medians of {args.rounds} interleaved rounds, "
        "each run a fresh process"
    )
    print(
        "| runner | r | images/s end to end | speedup vs r=0 | process s | outside the job s | "
        "model loading s | first row s | stopping Ray s | decode s | model s | decoding share | model waited s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for runner, _ in runners:
        base = None
        for setting in settings:
            runs = results[(runner, setting)]
            wall = statistics.median(r["wall"] for r in runs)
            base = base or wall
            keys = ("load_s", "first_row_s", "stop_s", "decode_s", "model_s", "wait_s", "outside")
            med = {k: statistics.median(r[k] for r in runs) for k in keys}
            share = med["decode_s"] / (med["decode_s"] + med["model_s"])
            wait = f"{med['wait_s']:.1f}" if runner == "local" else "-"
            stop = f"{med['stop_s']:.1f}" if runner.split()[0] == "--ray" else "-"
            print(
                f"| {runner} | {setting} | {args.photos / wall:.1f} | {base / wall:.2f}x | {wall:.1f} | "
                f"{med['outside']:.1f} | {med['load_s']:.1f} | {med['first_row_s']:.1f} | {stop} | "
                f"{med['decode_s']:.1f} | {med['model_s']:.1f} | {100 * share:.0f}% | {wait} |"
            )
    if len(runners) > 1:
        print()
        for runner, _ in runners[1:]:
            for setting in settings:
                local = statistics.median(r["wall"] for r in results[("local", setting)])
                other = statistics.median(r["wall"] for r in results[(runner, setting)])
                print(f"{runner} r={setting}: {other / local:.2f}x the local run's time")


if __name__ == "__main__":
    main()
