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

The picker lives in :mod:`tome.core.pass_threads` (a patched model's ``threads="auto"`` option
uses it for its own passes); tune imports it from here.

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

from tome.core.pass_threads import ThreadPicker, check_threads

__all__ = ["ThreadPicker", "check_threads"]
