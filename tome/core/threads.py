"""Run the merge step on the calling thread alone (CPU, eager).

A merge step is a dozen small ops (a similarity product, a sort, gathers, an index_add). On a CPU
each op larger than ATen's grain size (32,768 elements) runs as an OpenMP parallel region that
ends when every thread has finished its share; on a busy machine one of those threads is often
descheduled, and every region waits for it. The unpatched model runs a few large ops per block,
the merge step adds many small ones, so under load the merge step's stalls ate the speedup
(``benchmarks/busy.py``; docs/deployment.md). Alone on one thread, the merge step never waits for
another.

Alone is not always faster: on an idle machine the step's few large ops (the kept tokens' copy,
the keys' mean over heads) run faster on all threads, and on a machine with many cores a step
alone could cost more than its stalls. :class:`StepThreads` picks, per calling thread, by timing:
the step runs alone or on torch's threads, whichever took less time on average over the last few
steps of the same shape (the mean, not the median: stalls are rare and long), and the other way
is tried again every :data:`RETRY_EVERY` steps of that shape (the load changes).

The two mistakes cost very differently. Idle, a step alone costs about a millisecond more than
on both threads; under load a step on both threads stalls for 90-160 ms where alone it takes
2-14 ms (ViT-S/14, 224 px, batch 16, 2 threads, a spinning process on the other core; per-step
timings printed by ``python benchmarks/busy.py --step-timings``). So a load that arrives is
answered at once and for a while: a step on torch's threads that takes :data:`STALLED` times its
shape's recent mean sends every step of the thread, whatever its shape (load is the machine's,
not one shape's), alone for the next :data:`STALL_MEMORY` steps; then the means decide again.
Both ways give the same result (tests/test_threads.py).

How: OpenMP's thread count is a per-thread setting (``omp_set_num_threads`` changes the calling
thread's only); it is set to 1 for the step and restored after it, also on error. Not with
``torch.set_num_threads``: that also sets the count every thread that starts using torch at that
moment takes for good (a thread pool growing beside a patched model would be stuck at one thread).
Where torch runs on no OpenMP runtime this process can reach (checked once: the runtime must
change what ``torch.get_num_threads()`` reports), nothing changes. Nothing changes either under
``torch.compile`` (the compiled graph has its own threading) or on an accelerator. Matrix products
follow the count on an idle machine (a fp32 linear or bmm at 2 threads used 1 thread's CPU time
inside: ``benchmarks/calling_thread.py``) but not under load: MKL keeps its own count there
(``benchmarks/calling_thread.py --busy``), and a step alone then costs more than it would at a
true single thread (``experiments/merge_step_cold.py --busy``; docs/deployment.md).

:func:`calling_thread_count` sets any count the same way, for callers that pick a count for
whole passes (:mod:`tome.tools.tune.threads`).

>>> import torch
>>> before = torch.get_num_threads()
>>> with calling_thread_only(torch.zeros(1)):
...     inside = torch.get_num_threads()
>>> inside == 1 or not can_run_alone(), torch.get_num_threads() == before
(True, True)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

__all__ = [
    "RETRY_EVERY",
    "STALLED",
    "StepThreads",
    "calling_thread_count",
    "calling_thread_only",
    "can_run_alone",
]

RETRY_EVERY = 16  # steps between tries of the way not taken
STALLED = 2.0  # a shared step this many times its shape's recent mean: load arrived
STALL_MEMORY = 8 * RETRY_EVERY  # steps of the thread that run alone after a stall
_KEPT = 5  # timings kept per way


@functools.cache
def _omp_set_num_threads() -> Callable[[int], int] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch's CPU ops run on, or ``None`` where
    there is none to be found (another build, another platform)."""
    try:
        setter = ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError, TypeError):
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], None
    threads = torch.get_num_threads()
    if threads == 1:
        setter(2)
        works = torch.get_num_threads() == 2
    else:
        setter(1)
        works = torch.get_num_threads() == 1
    setter(threads)
    return setter if works and torch.get_num_threads() == threads else None


def can_run_alone() -> bool:
    """Whether :func:`calling_thread_only` can confine ops to the calling thread here."""
    return _omp_set_num_threads() is not None


def calling_thread_only(like: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context that runs the enclosed ops on the calling thread alone when ``like`` (a
    tensor the ops work on) is on the CPU and the code runs eagerly; otherwise (compiling, an
    accelerator, one thread already, no reachable OpenMP runtime) a no-op context, which Dynamo
    traces as such."""
    if torch.compiler.is_compiling() or like.device.type != "cpu":
        return contextlib.nullcontext()
    threads = torch.get_num_threads()
    setter = _omp_set_num_threads() if threads > 1 else None
    return contextlib.nullcontext() if setter is None else _ThreadCount(setter, 1, threads)


def calling_thread_count(threads: int) -> contextlib.AbstractContextManager:
    """A context that runs the enclosed CPU ops at ``threads`` threads: the calling thread's
    OpenMP count, restored on exit (also on error); other threads, and threads that start using
    torch meanwhile, keep theirs. Where no OpenMP runtime is reachable, ``torch.set_num_threads``
    (restored likewise; there it is the only way)."""
    own = torch.get_num_threads()
    if threads == own:
        return contextlib.nullcontext()
    return _ThreadCount(_omp_set_num_threads() or torch.set_num_threads, threads, own)


class _ThreadCount:
    """Sets a thread count with ``setter`` (the calling thread's ``omp_set_num_threads``, or
    ``torch.set_num_threads``) to ``inside``; restores ``own`` on exit."""

    def __init__(self, setter: Callable[[int], None], inside: int, own: int) -> None:
        self.setter, self.inside, self.own = setter, inside, own

    def __enter__(self) -> None:
        self.setter(self.inside)

    def __exit__(self, *exc: object) -> None:
        self.setter(self.own)


class _Ways:
    """The timings of one kind of step (one input shape) each way, and its count of steps."""

    __slots__ = ("steps", "timings")

    def __init__(self) -> None:
        self.timings: dict[bool, deque] = {True: deque(maxlen=_KEPT), False: deque(maxlen=_KEPT)}
        self.steps = 0

    def pick(self) -> bool:
        self.steps += 1
        tried = self.timings
        for way in (True, False):  # each way a few times first
            if len(tried[way]) < 2:
                return way
        best = statistics.fmean(tried[True]) <= statistics.fmean(tried[False])
        return (not best) if self.steps % RETRY_EVERY == 0 else best


class StepThreads(threading.local):
    """Per calling thread: whether merge steps run alone (:func:`calling_thread_only`) or on
    torch's threads, picked by timing the steps, apart for every input shape (a model's blocks
    see different token counts: like is compared with like). Each thread of a program picks for
    itself (its own load, its own thread count). Kept by a handle as per-pass state: never copied
    or pickled.

    >>> choice = StepThreads()
    >>> x = torch.zeros(4, 8)
    >>> for _ in range(6):
    ...     with choice.step(x):
    ...         _ = x + 1
    >>> [len(choice.shapes[(4, 8)].timings[way]) > 0 for way in (True, False)]  # both ways tried
    [True, True]
    """

    def __init__(self) -> None:
        self.shapes: dict[tuple[int, ...], _Ways] = {}
        self.alone = True
        self.steps = 0  # merge steps of this thread, all shapes
        self.stalled_at: int | None = None  # the step whose shared run stalled last

    def _pick(self, ways: _Ways) -> bool:
        self.steps += 1
        if self.stalled_at is not None and self.steps - self.stalled_at <= STALL_MEMORY:
            return True
        return ways.pick()

    def step(self, like: torch.Tensor) -> contextlib.AbstractContextManager:
        """A context for one merge step on ``like`` (the tokens it merges), timed; a no-op
        context where :func:`calling_thread_only` would be one."""
        alone = calling_thread_only(like)
        if isinstance(alone, contextlib.nullcontext):
            return alone
        ways = self.shapes.get(tuple(like.shape))
        if ways is None:
            ways = self.shapes[tuple(like.shape)] = _Ways()
        self.alone = self._pick(ways)
        return _Timed(self, ways, self.alone, alone if self.alone else contextlib.nullcontext())

    def follow(self, like: torch.Tensor) -> contextlib.AbstractContextManager:
        """A context for work of the step that runs outside :meth:`step` (the similarity
        features, taken in the attention): the way this thread's latest step took, untimed."""
        return calling_thread_only(like) if self.alone else contextlib.nullcontext()


class _Timed:
    def __init__(self, owner: StepThreads, ways: _Ways, way: bool, inner: contextlib.AbstractContextManager):
        self.owner, self.ways, self.way, self.inner = owner, ways, way, inner

    def __enter__(self) -> None:
        self.inner.__enter__()
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.start
        self.inner.__exit__(*exc)
        shared = self.ways.timings[False]
        if not self.way and len(shared) >= 2 and elapsed > STALLED * statistics.fmean(shared):
            self.owner.stalled_at = self.owner.steps
        self.ways.timings[self.way].append(elapsed)
