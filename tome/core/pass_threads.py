"""The thread count of whole forward passes on a CPU: a fixed count, or picked by timing.

On a CPU each op of a forward pass larger than ATen's grain size runs as an OpenMP parallel
region that ends when every thread has finished its share. When another job holds a core, a
thread is often descheduled and every region waits for it: on a 2-core machine with the other
core busy, ViT-S/14 at 2 threads ran 2.4-4.5x slower than idle, at 1 thread barely slower
(``benchmarks/busy.py``, docs/deployment.md). Neither count is right everywhere, and the load
comes and goes, so :class:`ThreadPicker` times passes at torch's own count and at 1 and runs the
rest at the faster one, trying the other again now and then, with at most ``share`` (a
twentieth) of the time spent on such tries.

:class:`ThreadPicker` serves :func:`tome.tune` (its passes are counted in FLOPs) and
:class:`PassThreads` a patched model's own forward passes (the ``threads`` option of
``tome.patch``: one picker per input shape, as like is compared with like). A count is set for
the calling thread alone (:func:`tome.core.threads.calling_thread_count`: its OpenMP count, which
matrix products follow too) and restored after the pass, also on error: other threads, and
threads that start using torch during a pass, keep theirs. A thread count changes no result: the
outputs of a pass are bit-identical at 1 and 2 threads (tested).

>>> import torch
>>> own = torch.get_num_threads()
>>> picker = ThreadPicker(1)
>>> picker.run(lambda: torch.get_num_threads(), work=1.0), torch.get_num_threads() == own
(1, True)
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from tome.core.threads import calling_thread_count

__all__ = ["PassThreads", "ThreadPicker", "check_threads"]

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
        self.record(threads, best, time.perf_counter() - start, work)
        return out

    def record(self, threads: int, best: int, seconds: float, work: float) -> None:
        """A pass of ``work`` units took ``seconds`` at ``threads`` (picked while :attr:`best`
        was ``best``)."""
        self.seconds[threads] += seconds
        if work > 0:
            self.rates[threads].append(seconds / work)
            self.since_try = self.since_try + seconds if threads == best else 0.0

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


class PassThreads(threading.local):
    """Per calling thread: the thread count of a patched model's forward passes (the ``threads``
    option), set when a pass begins and restored when it ends; with ``"auto"``, one
    :class:`ThreadPicker` per input shape. Kept by a handle as per-call state: never copied or
    pickled. A pass that begins inside another (a patched model called by a patched model) runs
    at the count of the outer one.

    >>> passes = PassThreads()
    >>> passes.begin(1, key=((2, 3),))
    >>> inside = torch.get_num_threads()
    >>> passes.end()
    >>> inside, len(passes.running)
    (1, 0)
    """

    def __init__(self) -> None:
        self.pickers: dict[tuple, ThreadPicker] = {}
        self.running: list[tuple | None] = []

    def begin(self, threads: int | str, key: tuple) -> None:
        """A pass of input shapes ``key`` begins at ``threads`` (an int, or ``"auto"``)."""
        if self.running:
            self.running.append(None)
            return
        picker = self.pickers.get((threads, key))
        if picker is None:
            picker = self.pickers[(threads, key)] = ThreadPicker(threads)
        count, best = picker.pick(1.0), picker.best
        context = calling_thread_count(count)
        context.__enter__()
        self.running.append((picker, count, best, context, time.perf_counter()))

    def end(self) -> None:
        """The pass that began last ends (also on error): its thread count is restored."""
        if not self.running:
            return
        entry = self.running.pop()
        if entry is None:
            return
        picker, count, best, context, start = entry
        seconds = time.perf_counter() - start
        context.__exit__(None, None, None)
        picker.record(count, best, seconds, 1.0)
