"""A merge step as a model runs it: right after a large matrix product, against a baseline.

Inside a forward pass the merge step runs after the block's own matrix products, which push
its code and data out of the CPU's caches. A step timed in a loop on its own ("hot") misses that:
after a fp32 ``linear`` of MLP size, one step of ViT-S/14 at batch 1 took ~3x its hot time, a
single tiny op ~50x (``python experiments/merge_step_cold.py --single-ops``), and every op kind
the step uses pays again (ten different tiny ops cost ~0.4 ms there, ten of one kind ~0.15 ms).
So on CPU the step's cost at small batches is mostly how many ops, and how many kinds of op, it
runs.

One step here is what ``ToMeHandle`` runs per block: the keys' mean over heads (keys as a
strided view of a fused qkv output, as timm and transformers leave them), the matching
(``bipartite_soft_matching``, ``protected=1``, sizes from an earlier merge), the merge (``mlerp``
by default) and ``advance``. It prints, per case, the median time "cold" (each call right after
the ``linear``) and "hot" (the same call again at once) for this checkout's ``tome.core`` and for
a baseline copy of ``tome/core/merge.py`` + ``matching.py`` at a git revision, interleaved in
every repetition, and checks that both give bit-identical results.

    python experiments/merge_step_cold.py                          # baseline: git HEAD
    python experiments/merge_step_cold.py --baseline 5d9c2c2 --reps 200
    python experiments/merge_step_cold.py --threads 2 --mode mean
    python experiments/merge_step_cold.py --single-ops             # the cache effect alone
    python experiments/merge_step_cold.py --compiled               # this tree eager vs torch.compile'd
    python experiments/merge_step_cold.py --busy                   # 2 threads, the other core busy
    python experiments/merge_step_cold.py --thresholds             # the two size rules of matching

``--busy`` (2 threads, a spinning process on the other core, ``benchmarks/busy.py``'s spinner):
this tree's step at batch 16 right after the linear, run on torch's threads ("shared"), alone
as ``ToMeHandle`` runs it (``calling_thread_only``: the calling thread's OpenMP count) and after
``torch.set_num_threads(1)`` (the process's count, MKL's included), in turn; idle and busy. Where
"alone" is slower than ``set_num_threads(1)``, something in the step did not obey the calling
thread's count (MKL's products do not, under load: ``benchmarks/calling_thread.py --busy``).

``--thresholds`` times the two ways of each size rule in ``tome.core.matching`` right after the
linear, at score sizes on both sides of its threshold: ranking by a stable sort or by ``topk``
and its check (``_SORT_AT_MOST`` values), and best partners in one ``max`` pass or for the
chosen rows only (``_ONE_PASS_SCORES`` scores). The thresholds were set from such a sweep; the
step's figures above come from other token counts.

``--compiled`` races this tree's step eager against the same step ``torch.compile``'d on its own
(inductor, ``dynamic=True``, ``fullgraph=True``: one compilation for every token count).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tome.core import matching as current_matching  # noqa: E402
from tome.core import merge as current_merge  # noqa: E402

# (batch, tokens, r): ViT-S/14 at 224 px (first, middle and last merging blocks of r=16), a
# batch of 16, and 518 px at batch 4
CASES = ((1, 257, 16), (1, 170, 16), (1, 81, 16), (16, 170, 16), (4, 1370, 64))
HEADS, HEAD_DIM, WIDTH = 6, 64, 384


def load_baseline(revision: str):
    """``(matching, merge)`` modules of ``tome/core`` at a git revision, as a separate package."""
    folder = Path(tempfile.mkdtemp()) / "tome_baseline_core"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for name in ("merge", "matching"):
        shown = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{revision}:tome/core/{name}.py"],
            capture_output=True,
            text=True,
        )
        if shown.returncode != 0:
            continue  # before the matching had its own module
        (folder / f"{name}.py").write_text(shown.stdout.replace("tome.core.", "tome_baseline_core."))
    sys.path.insert(0, str(folder.parent))
    merge = importlib.import_module("tome_baseline_core.merge")
    try:
        matching = importlib.import_module("tome_baseline_core.matching")
    except ModuleNotFoundError:
        matching = merge
    return matching, merge


def make_step(matching, merge, keys: torch.Tensor, x: torch.Tensor, sizes: torch.Tensor, r: int, mode: str):
    history = merge.MergeHistory(torch.arange(x.shape[1]).expand(x.shape[:2]), sizes)

    def step():
        plan = matching.bipartite_soft_matching(keys.mean(dim=-2), r, history, 1)
        return merge.merge(plan, x, mode), merge.advance(history, plan)

    return step


def case_inputs(batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys, x, sizes)`` of one case: keys ``(B, N, heads, head_dim)`` as a strided view of a
    fused qkv output (as the key hooks see them), tokens, and sizes from an earlier merge."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(batch, tokens, 3, HEADS, HEAD_DIM, generator=gen)[:, :, 1]
    x = torch.randn(batch, tokens, WIDTH, generator=gen)
    return keys, x, torch.randint(1, 4, (batch, tokens), generator=gen).float()


def race(steps: dict[str, Callable[[], object]], before: Callable[[], object], reps: int):
    """``(cold, hot)``: per step, the median ms right after ``before`` and at once again,
    the steps interleaved in every repetition."""
    runs = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            runs[name].append(timed(before, fn))
    cold = {n: statistics.median(c for c, _ in v) * 1e3 for n, v in runs.items()}
    hot = {n: statistics.median(h for _, h in v) * 1e3 for n, v in runs.items()}
    return cold, hot


def timed(before: Callable[[], object], fn: Callable[[], object]) -> tuple[float, float]:
    """Seconds of ``fn`` right after ``before``, then of ``fn`` again at once."""
    before()
    start = time.perf_counter()
    fn()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    fn()
    return cold, time.perf_counter() - start


def single_ops(reps: int) -> None:
    """The cache effect alone: tiny ops right after the large ``linear``, and after nothing."""
    heavy = large_product()
    tiny = torch.randn(4, 64)
    index = torch.randint(0, 4, (4, 8))

    def ten_kinds():
        tiny.norm(dim=-1), tiny.add(1.0), tiny.mul(2.0), tiny.sub(tiny), torch.topk(tiny, 3)
        torch.sort(tiny, stable=True), tiny.cumsum(-1), tiny.gather(1, index), tiny.amax(-1)
        torch.where(tiny > 0, tiny, 0.0)

    def ten_of_one():
        for _ in range(10):
            tiny.add(1.0)

    print("| ops | after the linear ms | hot ms |\n|---|---|---|")
    for label, fn in (
        ("one add", lambda: tiny.add(1.0)),
        ("ten of one kind", ten_of_one),
        ("ten kinds", ten_kinds),
    ):
        runs = [timed(heavy, fn) for _ in range(reps)]
        cold, hot = (statistics.median(t) * 1e3 for t in zip(*runs, strict=True))
        print(f"| {label} | {cold:.3f} | {hot:.3f} |")


def compiled_report(reps: int, mode: str) -> None:
    """This tree's step eager against the same function ``torch.compile``'d."""

    def step(keys: torch.Tensor, x: torch.Tensor, sizes: torch.Tensor, source: torch.Tensor, r: int):
        history = current_merge.MergeHistory(source, sizes)
        plan = current_matching.bipartite_soft_matching(keys.mean(dim=-2), r, history, 1)
        return current_merge.merge(plan, x, mode), current_merge.advance(history, plan)

    compiled = torch.compile(step, dynamic=True, fullgraph=True)
    heavy = large_product()
    print(f"mode {mode}; compiled: inductor, dynamic shapes, fullgraph\n")
    print("| batch | tokens | r | eager after the linear ms | compiled after the linear ms | "
          "eager hot ms | compiled hot ms |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for batch, tokens, r in CASES:
        keys, x, sizes = case_inputs(batch, tokens)
        source = torch.arange(tokens).expand(batch, tokens)
        inputs = (keys, x, sizes, source, r)
        steps = {
            "eager": lambda inputs=inputs: step(*inputs),
            "compiled": lambda inputs=inputs: compiled(*inputs),
        }
        torch.testing.assert_close(steps["eager"]()[0], steps["compiled"]()[0])  # also compiles
        cold, hot = race(steps, heavy, reps)
        print(f"| {batch} | {tokens} | {r} | {cold['eager']:.3f} | {cold['compiled']:.3f} | "
              f"{hot['eager']:.3f} | {hot['compiled']:.3f} |", flush=True)  # fmt: skip


def busy_report(reps: int, mode: str) -> None:
    """One step at batch 16 three ways (shared, alone, set_num_threads(1)), idle and busy."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from busy import spinner

    from tome.core.threads import calling_thread_only

    torch.set_num_threads(2)
    batch, tokens, r = 16, 170, 16
    keys, x, sizes = case_inputs(batch, tokens)
    step = make_step(current_matching, current_merge, keys, x, sizes, r, mode)
    heavy = large_product()

    def alone():
        with calling_thread_only(x):
            step()

    def one_thread():
        torch.set_num_threads(1)
        try:
            step()
        finally:
            torch.set_num_threads(2)

    ways = {"shared": step, "alone (calling thread's count)": alone, "torch.set_num_threads(1)": one_thread}
    print(f"mode {mode}; batch {batch}, {tokens} tokens, r={r}; 2 threads; ms right after the linear\n")
    print("| way | idle median | idle mean | busy median | busy mean |\n|---|---|---|---|---|")
    found = {name: {} for name in ways}
    with spinner() as spin:
        for phase in ("idle", "busy"):
            if phase == "busy":
                spin.resume()
            runs = {name: [] for name in ways}
            for _ in range(reps):
                for name, fn in ways.items():
                    runs[name].append(timed(heavy, fn)[0])
            for name, times in runs.items():
                found[name][phase] = (statistics.median(times) * 1e3, statistics.fmean(times) * 1e3)
            if phase == "busy":
                spin.pause()
    for name, cells in found.items():
        (im, ia), (bm, ba) = cells["idle"], cells["busy"]
        print(f"| {name} | {im:.2f} | {ia:.2f} | {bm:.2f} | {ba:.2f} |")


def thresholds_report(reps: int) -> None:
    """Both ways of each size rule of the matching, right after the linear (medians, ms)."""
    heavy = large_product()
    matching = current_matching
    print(
        f"sort at most {matching._SORT_AT_MOST} values; one pass up to {matching._ONE_PASS_SCORES} scores\n"
    )
    print("| batch | A | B | values | scores | sort ms | topk ms | one pass ms | chosen rows ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, rows, cols, r in ((1, 85, 84, 16), (1, 288, 287, 100), (16, 85, 84, 23), (16, 128, 127, 16),
                                 (32, 128, 127, 16), (4, 685, 684, 64)):  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        values, scores = (
            torch.randn(batch, rows, generator=gen),
            torch.randn(batch, rows, cols, generator=gen),
        )

        def topk(values=values, r=r):
            top = torch.topk(values, r + 1, dim=-1)
            return top.indices[:, :r] if bool((top.values[:, :-1] > top.values[:, 1:]).all()) else None

        def one_pass(scores=scores, r=r):
            best, partner = scores.max(dim=-1)
            a_index = matching._sort_descending(best).indices[:, :r]
            return a_index, partner.gather(1, a_index)

        def chosen_rows(scores=scores, r=r):
            a_index = matching._sort_descending(scores.amax(dim=-1)).indices[:, :r]
            flat = scores.reshape(-1, scores.shape[-1]).index_select(
                0, current_merge._rows(a_index, scores.shape[1])
            )
            return a_index, flat.max(dim=-1).indices.view(-1, r)

        ways = {
            "sort": lambda values=values, r=r: matching._sort_descending(values).indices[:, :r],
            "topk": topk,
            "one pass": one_pass,
            "chosen rows": chosen_rows,
        }
        cold, _ = race(ways, heavy, reps)
        print(f"| {batch} | {rows} | {cols} | {values.numel()} | {scores.numel()} | {cold['sort']:.3f} | "
              f"{cold['topk']:.3f} | {cold['one pass']:.3f} | {cold['chosen rows']:.3f} |", flush=True)  # fmt: skip


def large_product() -> Callable[[], torch.Tensor]:
    """A fp32 ``linear`` of ViT-S/14's MLP size at 224 px, batch 12 (2,352 x 384 -> 1,536)."""
    inputs, weight = torch.randn(2352, WIDTH), torch.randn(4 * WIDTH, WIDTH)
    return lambda: torch.nn.functional.linear(inputs, weight)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision of the baseline (default HEAD)")
    parser.add_argument("--reps", type=int, default=150, help="interleaved repetitions (default 150)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--mode", default="mlerp", choices=("mean", "mlerp"))
    parser.add_argument("--single-ops", action="store_true", help="only the cache effect on tiny ops")
    parser.add_argument("--compiled", action="store_true", help="this tree's step eager vs torch.compile'd")
    parser.add_argument("--busy", action="store_true", help="2 threads, the other core busy: three ways")
    parser.add_argument("--thresholds", action="store_true", help="both ways of matching's two size rules")
    args = parser.parse_args(argv)
    if args.busy:
        args.threads = 2  # the busy report runs at 2 threads
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.reps} interleaved runs\n")
    with torch.inference_mode():
        if args.single_ops:
            single_ops(args.reps)
            return
        if args.compiled:
            compiled_report(args.reps, args.mode)
            return
        if args.busy:
            busy_report(args.reps, args.mode)
            return
        if args.thresholds:
            thresholds_report(args.reps)
            return
        base_matching, base_merge = load_baseline(args.baseline)
        heavy = large_product()
        print(f"mode {args.mode}; baseline: tome/core at {args.baseline}\n")
        print("| batch | tokens | r | baseline after the linear ms | this tree after the linear ms | "
              "change | baseline hot ms | this tree hot ms |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
        for batch, tokens, r in CASES:
            keys, x, sizes = case_inputs(batch, tokens)
            steps = {
                "baseline": make_step(base_matching, base_merge, keys, x, sizes, r, args.mode),
                "tree": make_step(current_matching, current_merge, keys, x, sizes, r, args.mode),
            }
            (out_a, hist_a), (out_b, hist_b) = steps["baseline"](), steps["tree"]()
            same = torch.equal(out_a, out_b) and torch.equal(hist_a.source, hist_b.source)
            if not (same and torch.equal(hist_a.sizes, hist_b.sizes)):
                raise SystemExit(f"results differ at batch {batch}, {tokens} tokens, r={r}")
            cold, hot = race(steps, heavy, args.reps)
            change = cold["tree"] / cold["baseline"] - 1
            print(f"| {batch} | {tokens} | {r} | {cold['baseline']:.3f} | {cold['tree']:.3f} | {change:+.0%} | "
                  f"{hot['baseline']:.3f} | {hot['tree']:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
