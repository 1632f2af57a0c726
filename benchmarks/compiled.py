"""Compiled and bf16 token merging: torch.compile speedups against the FLOP-ideal, and the bf16
merge step's share of a forward pass.

One command, one process; prints two markdown tables (docs/compiled.md)::

    python benchmarks/compiled.py                       # both parts, batch 16, 5 reps
    python benchmarks/compiled.py --quick               # a smoke run: batch 2, 1 rep, 224 px only
    python benchmarks/compiled.py --parts bf16 --reps 7 --threads 1
    python benchmarks/compiled.py --parts bf16-compiled  # bf16, compiled: merging's share vs native

Models: ViT-S/14 (DINOv2-S's layout: 384 wide, 12 blocks, 6 heads, LayerScale) in timm
(``vit_small_patch14_dinov2``) and in transformers (``Dinov2Model``, SDPA attention), random
weights (speed does not depend on them; the schedule fixes the token counts), fp32 unless noted.

1. ``compile``: at 224 px (257 tokens), each setting its own model instance (so each compiled
   graph sees one fixed configuration): the unpatched model ``torch.compile``'d (inductor), and
   the patched model at r = 16 and r = (16, -0.75) ``torch.compile(..., fullgraph=True)``; the
   same three eager beside them. Every repetition runs each setting once, in turn (interleaved),
   after one untimed warm-up (the compilation); medians. Speedup = unpatched / patched time, in
   the same mode; FLOP-ideal = FLOPs unpatched / FLOPs patched, counted from the tokens every
   block saw (``model.tome.tokens_per_layer``, ``benchmarks/speed.py``'s count); efficiency =
   speedup / FLOP-ideal.
2. ``bf16``: the merge step's share of one eager forward pass at 224 px (r = 16) and 518 px
   (1370 tokens, r = 64), under CPU autocast (bf16) and with the model and input cast with
   ``.to(torch.bfloat16)``, and in fp32 beside them for comparison: the wall time inside ``tome.core.merge``'s matching
   (``bipartite_soft_matching``) and merging (``merge``, ``advance``), timed by wrappers around
   those functions, over the whole pass; medians of the per-pass shares of ``--reps`` passes
   (interleaved over the settings), the median forward time and the median time in the merge
   step itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import speed  # noqa: E402

import tome  # noqa: E402
from tome.core import merge as M  # noqa: E402

SCHEDULES = [16, (16, -0.75)]
BF16_CASES = [(224, 16), (518, 64)]  # (px, r)
MERGE_PARTS = {"bipartite_soft_matching": "merge", "merge": "merge", "advance": "merge"}


def vit_s14(family: str, size: int) -> speed.Model:
    """ViT-S/14 with DINOv2-S's layout, random weights, at ``size`` px."""
    torch.manual_seed(0)
    if family == "timm":
        import timm

        module = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=size).eval()
        return speed._timm_model(module, size)
    import transformers

    config = transformers.Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=size
    )
    module = transformers.Dinov2Model(config).eval()
    module.set_attn_implementation("sdpa")
    return speed.Model(module, "transformers", 384, 4 * 384, 12, 14, size)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _label(r: object) -> str:
    return speed._r_text(r) if r else "unpatched"


# -- 1. compiled vs compiled ------------------------------------------------------------------


def compile_part(family: str, batch: int, reps: int, log) -> list[str]:
    """Rows of the compiled table for one family: each schedule, compiled and eager."""
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    models: dict[object, speed.Model] = {}
    runs: dict[tuple[str, object], object] = {}
    for r in [0, *SCHEDULES]:
        model = vit_s14(family, 224)
        if r:
            tome.patch(model.module, r=r)
        models[r] = model
        runs[("eager", r)] = model
        # fullgraph for the patched models: a graph break would be an error, not a slow path
        compiled = torch.compile(model.module, fullgraph=bool(r))
        runs[("compiled", r)] = speed.Model(compiled, *_fields(model))
    times: dict[tuple[str, object], list[float]] = {key: [] for key in runs}
    tokens: dict[object, list[int]] = {}
    with torch.inference_mode():
        for key, run in runs.items():
            log(f"  {family} {key[0]} {_label(key[1])}: warm-up {_timed(lambda run=run: run(x)):.1f}s")
            mode, r = key
            if mode == "eager":
                handle = getattr(models[r].module, "tome", None)
                tokens[r] = list(handle.tokens_per_layer) if r else [models[r].tokens] * 13
        for rep in range(reps):
            for key, run in runs.items():
                times[key].append(_timed(lambda run=run: run(x)))
            log(f"    rep {rep + 1}/{reps}: " + ", ".join(f"{t[-1]:.2f}s" for t in times.values()))
    rows = []
    spec = models[0]
    for mode in ("compiled", "eager"):
        base = statistics.median(times[(mode, 0)])
        for r in SCHEDULES:
            t = statistics.median(times[(mode, r)])
            ideal = spec.flops(tokens[0]) / spec.flops(tokens[r])
            rows.append(
                f"| ViT-S/14 {family} | {mode} | {_label(r)} | {tokens[r][0]}→{tokens[r][-1]} | "
                f"{batch / base:.1f} | {batch / t:.1f} | {base / t:.2f}x | {ideal:.2f}x | {base / t / ideal:.3f} |"
            )
    gains = [
        statistics.median(times[("eager", r)]) / statistics.median(times[("compiled", r)])
        for r in runs_r(runs)
    ]
    note = ", ".join(f"{_label(r)} {g:.2f}x" for r, g in zip(runs_r(runs), gains, strict=True))
    rows.append(f"| ViT-S/14 {family} | compiled / eager | {note} | | | | | | |")
    return rows


def runs_r(runs: dict) -> list:
    return [r for mode, r in runs if mode == "eager"]


def _fields(model: speed.Model) -> tuple:
    return model.family, model.width, model.hidden, model.depth, model.patch, model.size


# -- 2. bf16 merge step -------------------------------------------------------------------------


def bf16_part(family: str, batch: int, batch_518: int, reps: int, sizes: list[int], log) -> list[str]:
    rows = []
    for size, r in (case for case in BF16_CASES if case[0] in sizes):
        b = batch if size == 224 else batch_518
        model = vit_s14(family, size)
        tome.patch(model.module, r=r)
        x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))
        settings = {"fp32": (model, x), "autocast": (model, x), "to_bf16": None}  # fp32: the baseline
        cast = vit_s14(family, size)
        tome.patch(cast.module.to(torch.bfloat16), r=r)
        settings["to_bf16"] = (cast, x.to(torch.bfloat16))
        shares: dict[str, list[float]] = {k: [] for k in settings}
        totals: dict[str, list[float]] = {k: [] for k in settings}
        merges: dict[str, list[float]] = {k: [] for k in settings}  # seconds in the merge step
        with torch.inference_mode():
            for rep in range(reps + 1):  # the first round warms up
                for name, (m, inputs) in settings.items():
                    context = (
                        torch.autocast("cpu", dtype=torch.bfloat16)
                        if name == "autocast"
                        else contextlib.nullcontext()
                    )
                    parts = {"merge": 0.0}
                    with context, speed._wrapped(M, MERGE_PARTS, parts):
                        total = _timed(lambda m=m, inputs=inputs: m(inputs))
                    if rep:
                        shares[name].append(parts["merge"] / total)
                        merges[name].append(parts["merge"])
                        totals[name].append(total)
                log(
                    f"  {family} {size}px rep {rep}/{reps}: "
                    + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in totals.items() if v)
                )
        tokens = model.module.tome.tokens_per_layer
        for name in settings:
            rows.append(
                f"| ViT-S/14 {family} | {size} | {b} | {name} | {r} | {tokens[0]}→{tokens[-1]} | "
                f"{statistics.median(totals[name]):.3f} | {100 * statistics.median(shares[name]):.1f} | "
                f"{1e3 * statistics.median(merges[name]):.1f} |"
            )
    return rows


# -- 3. bf16, compiled: what merging adds beyond the blocks at the merged token counts ----------


def bf16_compiled_part(batch: int, reps: int, log) -> list[str]:
    """timm ViT-S/14 at 224 px, r=16, ``.to(bf16)``: the patched model and "native" (the
    unpatched blocks' attention and MLP run on tokens of the counts the patched blocks see, no
    matching or merging: ``benchmarks/busy.py``'s row), each eager and ``torch.compile``'d. The
    merge step's share of the patched forward is estimated as 1 - native / patched: everything
    merging adds (matching, merging, proportional attention) beyond the work at those counts."""
    import busy

    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    patched = vit_s14("timm", 224).module.to(torch.bfloat16)
    base = vit_s14("timm", 224).module.to(torch.bfloat16)
    counts = busy.token_counts(vit_s14("timm", 224).module, 16, x.float())
    tome.patch(patched, r=16)
    tokens = [tuple(t.to(torch.bfloat16) for t in pair) for pair in busy.native_tokens(base, batch, counts)]
    native = busy.native_forward

    compiled_patched, compiled_native = torch.compile(patched, fullgraph=True), torch.compile(native)
    runs = {
        ("eager", "ToMe r=16"): lambda: patched(x),
        ("eager", "native"): lambda: native(base, x, tokens),
        ("compiled", "ToMe r=16"): lambda: compiled_patched(x),
        ("compiled", "native"): lambda: compiled_native(base, x, tokens),
    }
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    with torch.inference_mode():
        for key, run in runs.items():
            log(f"  bf16 {key[0]} {key[1]}: warm-up {_timed(run):.1f}s")
        for rep in range(reps):
            for key, run in runs.items():
                times[key].append(_timed(run))
            log(f"    rep {rep + 1}/{reps}: " + ", ".join(f"{t[-1]:.3f}s" for t in times.values()))
    rows = []
    for mode in ("eager", "compiled"):
        ours = statistics.median(times[(mode, "ToMe r=16")])
        bound = statistics.median(times[(mode, "native")])
        rows.append(
            f"| ViT-S/14 timm | {mode} | {batch} | {counts[0]}→{counts[-1]} | {1e3 * ours:.1f} | "
            f"{1e3 * bound:.1f} | {100 * (1 - bound / ours):.1f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2, 1 rep, 224 px only")
    parser.add_argument(
        "--parts", default="compile,bf16", help="comma-separated: compile, bf16, bf16-compiled"
    )
    parser.add_argument("--families", default="timm,transformers", help="comma-separated: timm, transformers")
    parser.add_argument("--batch", type=int, default=None, help="batch at 224 px (default 16; quick 2)")
    parser.add_argument("--batch-518", type=int, default=None, help="batch at 518 px (default 4; quick 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    parts, families = args.parts.split(","), args.families.split(",")
    for given, allowed, flag in (
        (parts, ("compile", "bf16", "bf16-compiled"), "--parts"),
        (families, ("timm", "transformers"), "--families"),
    ):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            parser.error(f"{flag}: expected some of {', '.join(allowed)}, got {', '.join(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (2 if args.quick else 16)
    batch_518 = args.batch_518 or (1 if args.quick else 4)
    reps = args.reps or (1 if args.quick else 5)
    sizes = [224] if args.quick else [224, 518]
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; "
        f"random weights; medians of {reps} interleaved repetitions\n"
    )
    if "compile" in parts:
        rows = [row for family in families for row in compile_part(family, batch, reps, log)]
        print(f"torch.compile (inductor; patched models fullgraph=True), 224 px, batch {batch}, fp32:\n")
        print(
            "| model | mode | r | tokens | unpatched img/s | ToMe img/s | speedup | FLOP-ideal | efficiency |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows) + "\n")
    if "bf16" in parts:
        rows = [row for family in families for row in bf16_part(family, batch, batch_518, reps, sizes, log)]
        print("merge step (matching + merging) share of an eager forward:\n")
        print("| model | px | batch | dtype | r | tokens | forward s | merge step % | merge step ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows) + "\n")
    if "bf16-compiled" in parts:
        rows = bf16_compiled_part(batch, reps, log)
        print("bf16 (.to), 224 px, r=16: the patched model against the blocks at its token counts:\n")
        print("| model | mode | batch | tokens | ToMe ms | native ms | merging's share % |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows) + "\n")
    print(f"{time.perf_counter() - start:.0f}s in all")


if __name__ == "__main__":
    main()
