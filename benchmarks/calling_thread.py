"""Do matrix products follow the calling thread's OpenMP count? CPU time against wall time of a
fp32 linear and a bmm at torch's thread count and inside ``calling_thread_only`` (one thread):
where a product runs on one thread, its CPU time is about its wall time.

    python benchmarks/calling_thread.py
    python benchmarks/calling_thread.py --busy    # a whole ViT forward, the other core busy

(``tome.core.threads`` sets the calling thread's OpenMP count for the merge step and tune's
passes; this checks that MKL's and oneDNN's products obey it on this build.)

``--busy``: timm ViT-S/14 (random weights), 224 px, batch 16, with a spinning process on the other
core (``benchmarks/busy.py``'s spinner): one forward pass at torch's 2 threads, inside
``calling_thread_count(1)`` (the calling thread's OpenMP count) and after
``torch.set_num_threads(1)`` (the process's count, MKL's included), in turn; wall seconds and
the CPU seconds torch's other threads spent meanwhile (from ``/proc``, Linux). Where the other
threads work or spin while the calling thread's count is 1, the products did not obey it.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tome.core.threads import calling_thread_count, calling_thread_only  # noqa: E402


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _other_threads_cpu() -> float:
    """CPU seconds of this process's threads other than the first (Linux ``/proc``)."""
    import os

    tasks = sorted(os.listdir(f"/proc/{os.getpid()}/task"), key=int)[1:]
    ticks = 0
    for task in tasks:
        with open(f"/proc/{os.getpid()}/task/{task}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def busy_forward(reps: int) -> None:
    import statistics

    import timm

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from busy import spinner

    torch.set_num_threads(2)
    model = timm.create_model("vit_small_patch14_dinov2", img_size=224, pretrained=False).eval()
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ways = ("torch's 2 threads", "calling_thread_count(1)", "torch.set_num_threads(1)")
    times: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
    with spinner() as spin, torch.inference_mode():
        model(x)
        spin.resume()
        for _ in range(reps):
            for way in ways:
                torch.set_num_threads(1 if way == ways[2] else 2)
                context = calling_thread_count(1) if way == ways[1] else torch.no_grad()
                start, other = time.perf_counter(), _other_threads_cpu()
                with context:
                    model(x)
                times[way].append((time.perf_counter() - start, _other_threads_cpu() - other))
        torch.set_num_threads(2)
        spin.pause()
    print(f"torch {torch.__version__}; ViT-S/14, 224 px, batch 16, the other core busy; medians of {reps}\n")
    print("| way | wall s | CPU s of the other threads |\n|---|---|---|")
    for way in ways:
        wall, other = (statistics.median(v) for v in zip(*times[way], strict=True))
        print(f"| {way} | {wall:.2f} | {other:.2f} |")


def main() -> None:
    if "--busy" in sys.argv[1:]:
        busy_forward(reps=3)
        return
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16 * 257, 384, generator=g), torch.randn(1536, 384, generator=g)
    a, b = torch.randn(16, 128, 384, generator=g), torch.randn(16, 129, 384, generator=g)
    ops = {
        "linear (4112x384 @ 384x1536)": lambda: torch.nn.functional.linear(x, w),
        "bmm (16 x 128x384 @ 384x129)": lambda: a @ b.transpose(-1, -2),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| op | way | wall s | CPU s | CPU / wall |\n|---|---|---|---|---|")
    for name, op in ops.items():
        op()
        for alone in (False, True, False, True):
            start, cpu = time.perf_counter(), _cpu()
            with calling_thread_only(x) if alone else torch.no_grad():
                for _ in range(20):
                    op()
            wall, used = time.perf_counter() - start, _cpu() - cpu
            way = "calling thread only" if alone else "torch's threads"
            print(f"| {name} | {way} | {wall:.3f} | {used:.3f} | {used / wall:.2f} |")


if __name__ == "__main__":
    main()
