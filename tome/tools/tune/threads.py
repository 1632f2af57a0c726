"""The thread count :func:`tome.tune` runs its forward passes at: torch's own or one, whichever
does a FLOP faster right now.

Tune's passes are small (a race runs a candidate on 4 photos) and there are a few hundred of
them. On a CPU each op of a pass larger than ATen's grain size runs as an OpenMP parallel region
that ends when every thread has finished its share; when another job holds a core, a thread is
often descheduled and every region waits for it. On a 2-core machine loaded by other jobs
(load average 4.3), tune's natural call on the shared DINOv2-S took 125 s with every pass at 2
threads and 38 s with this picker, which ran them at 1 (``benchmarks/tune_speed.py``,
``docs/tune.md``); on a quiet machine 2 threads are faster. Neither setting is right
everywhere, and the load changes while tune runs, so :class:`ThreadPicker` times the passes
(seconds per FLOP: the FLOPs of a pass are counted from its schedule) at both counts and runs
the rest at the faster one, trying the other again now and then, with at most ``share`` (a
twentieth) of the time spent on such tries.

A thread count changes no result here: the model's outputs were bit-identical at 1 and 2
threads (``tests/test_tune.py``), so the schedule tune chooses does not depend on it.

:meth:`ThreadPicker.run` sets the count of the calling thread alone
(:func:`tome.core.threads.calling_thread_count`: its OpenMP count, which matrix products follow
too) for one pass and restores it on exit, also on error: other threads, and threads that start
using torch during a pass, keep theirs. (``torch.set_num_threads`` would also fix the count of a
thread starting at that moment for good; it is used only where no OpenMP runtime is reachable.)

>>> import torch
>>> own = torch.get_num_threads()
>>> picker = ThreadPicker(1)
>>> picker.run(lambda: torch.get_num_threads(), work=1.0), torch.get_num_threads() == own
(1, True)
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from tome.core.threads import calling_thread_count

__all__ = ["ThreadPicker", "check_threads"]

T = TypeVar("T")


def check_threads(threads) -> None:
    """``threads`` must be ``"auto"`` or an int >= 1 (``ValueError`` naming it otherwise)."""
    if threads == "auto" and isinstance(threads, str):
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected 'auto' or an int >= 1, got {threads!r}")


class ThreadPicker:
    """Runs each pass at a thread count: ``threads`` (an int) always, or with ``"auto"`` the
    faster of torch's own count and 1 by recent seconds per unit of work.

    ``"auto"``: the first pass runs at 1 thread (tune's first pass, the unmerged reference, is
    its largest: on a busy machine, the safe count), the next at torch's own; then the faster
    one (the median of its last ``window`` timings) runs, except that the other is tried again
    whenever the time run since the last try is ``1 / share`` times what a try is expected to
    cost (the load changes)."""

    def __init__(self, threads: int | str = "auto", *, share: float = 0.05, window: int = 3) -> None:
        check_threads(threads)
        self.own = torch.get_num_threads()
        if threads == "auto":
            self.counts = (self.own, 1) if self.own > 1 else (self.own,)
        else:
            self.counts = (int(threads),)
        self.share, self.window = share, window
        self.rates: dict[int, list[float]] = {n: [] for n in self.counts}  # seconds per unit of work
        self.seconds: dict[int, float] = {n: 0.0 for n in self.counts}  # time run at each count
        self.since_try = 0.0  # seconds run at the preferred count since the other was tried

    def rate(self, threads: int) -> float:
        """Recent seconds per unit of work at ``threads`` (the median of the last few)."""
        return statistics.median(self.rates[threads][-self.window :])

    @property
    def best(self) -> int:
        """The thread count that ran a unit of work fastest lately (torch's own before any timing)."""
        timed = [n for n in self.counts if self.rates[n]]
        return min(timed, key=self.rate) if timed else self.counts[0]

    def pick(self, work: float) -> int:
        """The thread count for the next pass, of ``work`` units."""
        if len(self.counts) == 1:
            return self.counts[0]
        untimed = [n for n in self.counts if not self.rates[n]]
        if untimed:
            return untimed[-1]  # 1 first
        best = self.best
        other = next(n for n in self.counts if n != best)
        if self.since_try * self.share >= self.rate(other) * work:
            return other
        return best

    def run(self, fn: Callable[[], T], work: float) -> T:
        """``fn()`` at the picked thread count (``work``: its cost in any fixed unit, e.g. FLOPs);
        torch's thread count is restored afterwards, also on error."""
        threads = self.pick(work)
        best = self.best
        start = time.perf_counter()
        with calling_thread_count(threads):
            out = fn()
        seconds = time.perf_counter() - start
        self.seconds[threads] += seconds
        if work > 0:
            self.rates[threads].append(seconds / work)
            self.since_try = self.since_try + seconds if threads == best else 0.0
        return out

    @contextlib.contextmanager
    def at_best(self) -> Iterator[None]:
        """Run the enclosed (small, untimed) work at :attr:`best`, e.g. scoring a pass's outputs:
        at torch's count on a busy machine it waits as the passes do. Restored on exit."""
        with calling_thread_count(self.best):
            yield

    def summary(self) -> str:
        """``"1 thread"``, or how long each count ran and how they compared lately, e.g.
        ``"2 threads 14.0 s, 1 thread 2.0 s (lately 2 threads took 2.1x the time per FLOP of 1)"``."""

        def threads(n: int) -> str:
            return f"{n} thread{'s' if n > 1 else ''}"

        used = sorted((n for n in self.counts if self.seconds[n] > 0), key=lambda n: -self.seconds[n])
        if len(used) < 2 or not all(self.rates[n] for n in used):
            return threads(used[0] if used else self.counts[0])
        best = self.best
        other = next(n for n in used if n != best)
        ran = ", ".join(f"{threads(n)} {self.seconds[n]:.1f} s" for n in used)
        ratio = self.rate(other) / self.rate(best)
        return f"{ran} (lately {threads(other)} took {ratio:.1f}x the time per FLOP of {best})"
