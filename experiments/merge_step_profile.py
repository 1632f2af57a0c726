"""Where the time of a merge step goes: a 12-block ViT-S/14 chain at 224 px, op by op.

One "forward" here is the merge work of the 12 merging blocks of ViT-S/14 (DINOv2-S layout) at
224 px: ``x`` (B, 257, 384) -> (B, 241, 384) -> ... -> (B, 65, 384), keys averaged over heads
(B, N, 64) in the model's dtype, r = 16, protected = 1, mode ``mlerp`` (tome's default): every
block runs ``bipartite_soft_matching`` + ``merge`` + ``advance`` (what ``ToMeHandle.merge_layer``
calls). Inputs are random and fixed per block, so the chain is the same in every repetition.

It prints

1. per-step time (ms for the 12 blocks, and its matching / merge / advance parts), fp32 and
   bf16, at 1 and 2 threads, for this checkout's ``tome.core.merge`` and for a baseline copy
   of the module (``--baseline``: a file, or ``git:REV`` for the file at a git revision),
   interleaved in every repetition (drifts in load hit both alike); medians;
2. with ``--profile``, torch.profiler's per-op self CPU time of the chain (this checkout, or the
   baseline with ``--profile-baseline``). The profiler inflates the large copies
   (``index_select``) several times over: read its table for op counts and the small ops.

    python experiments/merge_step_profile.py                      # baseline: git HEAD
    python experiments/merge_step_profile.py --baseline /tmp/merge_orig.py --reps 15
    python experiments/merge_step_profile.py --profile --threads 1 --dtypes bf16
    python experiments/merge_step_profile.py --n0 1370 --r 64 --batch 4    # 518 px

It also checks that both versions give bit-identical outputs on every block.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tome.core import merge as current  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_baseline(spec: str):
    """The baseline module: a path to a copy of merge.py, or ``git:REV`` (read-only git show)."""
    if spec.startswith("git:"):
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{spec[4:]}:tome/core/merge.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        path = Path(tempfile.mkdtemp()) / "merge_baseline.py"
        path.write_text(text)
    else:
        path = Path(spec)
    module_spec = importlib.util.spec_from_file_location("merge_baseline", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["merge_baseline"] = module  # dataclasses look their module up
    module_spec.loader.exec_module(module)
    return module


def make_chain(batch: int, n0: int, r: int, layers: int, dim: int, key_dim: int, dtype: torch.dtype):
    """Fixed random inputs of every block: [(keys, x)], the sequence shrinking by r per block."""
    gen = torch.Generator().manual_seed(0)
    chain, n = [], n0
    for _ in range(layers):
        keys = torch.randn(batch, n, key_dim, generator=gen).to(dtype)
        x = torch.randn(batch, n, dim, generator=gen).to(dtype)
        chain.append((keys, x))
        n -= min(r, current.max_r(n, 1))
    return chain


def run_chain(
    module, chain, r: int, mode: str, parts: dict | None = None, keep: bool = False
) -> list[torch.Tensor]:
    """One forward's merge work; ``parts`` collects seconds per part when given. ``keep``:
    return every block's output (for the check); timed runs drop them, as a forward frees each
    block's input once the next has run (held outputs would fault in fresh pages every call)."""
    history = module.start_history(chain[0][0].shape[0], chain[0][0].shape[1])
    outs = []
    clock = time.perf_counter
    for keys, x in chain:
        step_r = min(r, module.max_r(keys.shape[1], 1))
        t0 = clock()
        plan = module.bipartite_soft_matching(keys, step_r, history, 1)
        t1 = clock()
        merged = module.merge(plan, x, mode)
        t2 = clock()
        history = module.advance(history, plan)
        t3 = clock()
        if parts is not None:
            parts["matching"] += t1 - t0
            parts["merge"] += t2 - t1
            parts["advance"] += t3 - t2
        if keep:
            outs.append(merged)
    return [*outs, history.source, history.sizes]


def check_identical(chain, r: int, mode: str, baseline) -> None:
    new, old = run_chain(current, chain, r, mode, keep=True), run_chain(baseline, chain, r, mode, keep=True)
    for i, (a, b) in enumerate(zip(new, old, strict=True)):
        if a.dtype != b.dtype or not torch.equal(a, b):
            raise SystemExit(f"outputs differ from the baseline at output {i} ({a.dtype} vs {b.dtype})")


def timings(args, baseline) -> None:
    print(
        f"torch {torch.__version__}; B={args.batch}, N0={args.n0}, r={args.r}, {args.layers} blocks, "
        f"C={args.dim}, keys D={args.key_dim}, mode {args.mode}; ms per forward (all blocks), "
        f"medians of {args.reps} interleaved repetitions"
    )
    header = (
        f"{'dtype':>5} {'thr':>3} | {'version':>8} | {'total':>7} {'matching':>8} {'merge':>7} {'advance':>7}"
    )
    print(header)
    print("-" * len(header))
    versions = {"baseline": baseline, "current": current}
    for dtype_name in args.dtypes:
        chain = make_chain(
            args.batch, args.n0, args.r, args.layers, args.dim, args.key_dim, DTYPES[dtype_name]
        )
        check_identical(chain, args.r, args.mode, baseline)
        for threads in args.threads:
            torch.set_num_threads(threads)
            samples = {v: {"total": [], "matching": [], "merge": [], "advance": []} for v in versions}
            with torch.inference_mode():
                for rep in range(args.reps + 1):  # the first round warms up
                    for name, module in versions.items():
                        parts = {"matching": 0.0, "merge": 0.0, "advance": 0.0}
                        start = time.perf_counter()
                        run_chain(module, chain, args.r, args.mode, parts)
                        total = time.perf_counter() - start
                        if rep:
                            samples[name]["total"].append(total)
                            for k, v in parts.items():
                                samples[name][k].append(v)
            for name in versions:
                med = {k: 1e3 * statistics.median(v) for k, v in samples[name].items()}
                print(
                    f"{dtype_name:>5} {threads:>3} | {name:>8} | {med['total']:>7.2f} {med['matching']:>8.2f} "
                    f"{med['merge']:>7.2f} {med['advance']:>7.2f}"
                )


def profile(args, module) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for dtype_name in args.dtypes:
        chain = make_chain(
            args.batch, args.n0, args.r, args.layers, args.dim, args.key_dim, DTYPES[dtype_name]
        )
        for threads in args.threads:
            torch.set_num_threads(threads)
            with torch.inference_mode():
                for _ in range(2):
                    run_chain(module, chain, args.r, args.mode)
                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(args.reps):
                        run_chain(module, chain, args.r, args.mode)
            print(
                f"\n== {module.__name__}, {dtype_name}, {threads} threads: self CPU time of {args.reps} forwards =="
            )
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="git:HEAD", help="merge.py to compare with (path or git:REV)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n0", type=int, default=257)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--key-dim", type=int, default=64)
    parser.add_argument("--mode", default="mlerp", choices=current.MODES)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables instead")
    parser.add_argument(
        "--profile-baseline", action="store_true", help="with --profile: profile the baseline"
    )
    parser.add_argument("--rows", type=int, default=25, help="profiler table rows")
    args = parser.parse_args()
    if args.profile:
        profile(args, load_baseline(args.baseline) if args.profile_baseline else current)
    else:
        timings(args, load_baseline(args.baseline))


if __name__ == "__main__":
    main()
