"""Do matrix products follow the calling thread's OpenMP count? CPU time against wall time of a
fp32 linear and a bmm at torch's thread count and inside ``calling_thread_only`` (one thread):
where a product runs on one thread, its CPU time is about its wall time.

    python benchmarks/calling_thread.py

(``tome.core.threads`` sets the calling thread's OpenMP count for the merge step and tune's
passes; this checks that MKL's and oneDNN's products obey it on this build.)
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

from tome.core.threads import calling_thread_only  # noqa: E402


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
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
