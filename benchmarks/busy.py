"""Token merging on a busy machine: patched vs unpatched at 2 threads, one core kept busy.

One command, one process. A plain spinning process (``while True: pass`` in a subprocess,
paused with SIGSTOP and resumed with SIGCONT) keeps one core busy during the "busy" phase of
every repetition and sleeps during its "idle" phase; each phase times the unpatched model and
every patched setting once, in turn, so slow drifts hit all alike. The table shows medians::

    python benchmarks/busy.py                       # all cases, batch 16, 5 reps: ~15 min on 2 cores
    python benchmarks/busy.py --cases timm,text --reps 3
    python benchmarks/busy.py --quick               # a smoke run: small inputs, 2 reps
    python benchmarks/busy.py --merge-step-ways     # each setting also with the merge step forced alone / shared
    python benchmarks/busy.py --native --cases timm # beside each setting: no merging, its token counts
    python benchmarks/busy.py --calls 4             # each setting 4 calls in a row per phase: a steady load
    python benchmarks/busy.py --step-timings        # each merge step's way and ms as the load comes and goes
    python benchmarks/busy.py --profile --cases timm   # top ops of the patched forward, busy
    python benchmarks/busy.py --merge-step          # old vs new merge step: op counts, CPU time
    python benchmarks/busy.py --strong              # (16, -1.0), (16, -0.75): tome vs reference

Cases (``--cases``): ``timm`` (ViT-S/14 in DINOv2's layout, random weights, 224 px, r = 16 and
(16, -0.75)), ``hf`` (transformers ``Dinov2Model``: the shared DINOv2-S in
``../shared/models/dinov2-small-saliency`` if present, else random, same r), ``text`` (BERT-base
layout, random weights, 128 tokens, ``ratio=0.1``) and ``unet`` (diffusers
``UNet2DConditionModel`` in SD 1.5's layout, random weights, 32 x 32 latents, ``ratio=0.5``).

Columns: FLOP-ideal = FLOPs of the unpatched forward / FLOPs of the patched one, both counted by
``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions, attention);
speedup = unpatched seconds / patched seconds (wall clock, medians); efficiency = speedup /
FLOP-ideal; busy/idle = busy speedup / idle speedup (1.0: merging loses nothing to the load).

``--merge-step`` compares the merge step of this tree with the one before the busy-machine
change (copied below as ``_old_*``; results are bit-identical, checked): profiler events per
step, ops whose inputs are large enough to run as a parallel region (>= 32768 elements,
``at::internal::GRAIN_SIZE``), CPU seconds of the calling thread at 1 thread
(``time.thread_time``) and, at 2 threads, CPU seconds the other thread spends per step (it
spins or works in every parallel region).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tome  # noqa: E402
from tome.core import merge as M  # noqa: E402

DINOV2 = ROOT.parent / "shared" / "models" / "dinov2-small-saliency"
CASES = ("timm", "hf", "text", "unet")
GRAIN = 32768  # at::internal::GRAIN_SIZE: smaller elementwise ops run on the calling thread


# -- the spinner ----------------------------------------------------------------------------------


class Spinner:
    """A busy-loop subprocess on the other core, paused (SIGSTOP) or running (SIGCONT)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        self.pause()

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)
        time.sleep(0.05)  # let it get scheduled

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@contextlib.contextmanager
def spinner() -> Iterator[Spinner]:
    spin = Spinner()
    try:
        yield spin
    finally:
        spin.close()


# -- models -------------------------------------------------------------------------------------


def _vision_input(batch: int, size: int) -> dict:
    return {"x": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))}


def build(case: str, batch: int, quick: bool) -> tuple[str, torch.nn.Module, Callable, dict, list[dict]]:
    """``(label, model, forward(model, inputs), inputs, patch settings)``."""
    torch.manual_seed(0)
    vit_settings = [{"r": 16}, {"r": (16, -0.75)}]
    if case == "timm":
        import timm

        size = 112 if quick else 224
        model = timm.create_model("vit_small_patch14_dinov2", img_size=size, pretrained=False).eval()
        label = f"timm ViT-S/14 (DINOv2 layout, random), {size} px, batch {batch}"
        settings = [{"r": 4}] if quick else vit_settings
        return label, model, lambda m, i: m(i["x"]), _vision_input(batch, size), settings
    if case == "hf":
        from transformers import Dinov2Config, Dinov2Model

        size = 112 if quick else 224
        if DINOV2.is_dir():
            model, what = Dinov2Model.from_pretrained(str(DINOV2)).eval(), "shared DINOv2-S"
        else:
            model, what = Dinov2Model(Dinov2Config()).eval(), "random DINOv2-B"
        label = f"transformers Dinov2Model ({what}, SDPA), {size} px, batch {batch}"
        settings = [{"r": 4}] if quick else vit_settings
        forward = lambda m, i: m(pixel_values=i["x"]).last_hidden_state  # noqa: E731
        return label, model, forward, _vision_input(batch, size), settings
    if case == "text":
        from transformers import BertConfig, BertModel

        length = 32 if quick else 128
        config = BertConfig(num_hidden_layers=4 if quick else 12)
        model = BertModel(config).eval()
        model.set_attn_implementation("sdpa")
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, config.vocab_size, (batch, length), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        label = f"BERT-base layout (random), {length} tokens, batch {batch}"
        forward = lambda m, i: m(**i).last_hidden_state  # noqa: E731
        return label, model, forward, inputs, [{"ratio": 0.1}]
    if case == "unet":
        import diffusers

        latent = 16 if quick else 32
        if quick:
            net = diffusers.UNet2DConditionModel(
                block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, norm_num_groups=8,
            )  # fmt: skip
            what, text = "tiny", (77, 32)
        else:
            net, what, text = (
                diffusers.UNet2DConditionModel(cross_attention_dim=768),
                "SD 1.5 layout",
                (77, 768),
            )
        g = torch.Generator().manual_seed(0)
        inputs = {
            "sample": torch.randn(batch, 4, latent, latent, generator=g),
            "timestep": torch.tensor(500),
            "encoder_hidden_states": torch.randn(batch, *text, generator=g),
        }
        label = f"diffusers UNet ({what}, random), {latent}x{latent} latents, batch {batch}"
        forward = lambda m, i: m(i["sample"], i["timestep"], i["encoder_hidden_states"]).sample  # noqa: E731
        return label, net.eval(), forward, inputs, [{"ratio": 0.5}]
    raise ValueError(f"case: expected one of {', '.join(CASES)}, got {case!r}")


# The merge step runs alone on the calling thread or on torch's threads, whichever is faster by
# its own timings (tome/core/threads.py: StepThreads). --merge-step-ways adds, beside each setting,
# the same with the way forced: "alone" always, or "shared" (torch's threads, as before).
WAY = "merge_step"  # a setting key: "alone" or "shared"
_ORIGINAL_PICK = None


def _force_way(way: str | None) -> None:
    global _ORIGINAL_PICK
    from tome.core.threads import StepThreads

    if _ORIGINAL_PICK is None:
        _ORIGINAL_PICK = StepThreads._pick
    StepThreads._pick = _ORIGINAL_PICK if way is None else (lambda self, ways, alone=(way == "alone"): alone)


# Each setting's merge-step timings (StepThreads), carried over its re-patching: a patched model
# in use keeps its handle, and so its timings, from call to call.
_TIMINGS: dict[tuple[int, str], object] = {}


def configure(model: torch.nn.Module, setting: dict | None) -> None:
    tome.unpatch(model)
    label = _label(setting)
    setting = dict(setting or {})
    _force_way(setting.pop(WAY, None))
    if setting and not setting.get(NATIVE):
        tome.patch(model, **setting)
        handle = model.tome
        handle._threads = _TIMINGS.setdefault((id(model), label), handle._threads)


def _cpu_attention_flops(query, key, value, *args, **kwargs) -> int:
    """FLOPs of ``_scaled_dot_product_flash_attention_for_cpu`` (torch counts its CUDA twin only)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)  # shapes (the counter passes shapes)


def flops(model: torch.nn.Module, forward: Callable, inputs: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        forward(model, inputs)
    return float(counter.get_total_flops())


def token_counts(model: torch.nn.Module, r, x: torch.Tensor) -> list[int]:
    """``model.tome.tokens_per_layer`` of a timm ViT patched at ``r`` (patched for one image, then
    unpatched again)."""
    tome.unpatch(model)
    tome.patch(model, r=r)
    with torch.inference_mode():
        model(x[:1])
    counts = list(model.tome.tokens_per_layer)
    tome.unpatch(model)
    return counts


def native_tokens(model: torch.nn.Module, batch: int, counts: list[int]) -> list[tuple[torch.Tensor, ...]]:
    """Random tokens for :func:`native_forward`, made once, outside the timing: per block, its
    attention's input (the count entering it) and its MLP's (the count leaving it:
    ``counts`` is ``tokens_per_layer``; a block merges between the two)."""
    g = torch.Generator().manual_seed(1)
    width = model.embed_dim
    return [
        (
            torch.randn(batch, counts[i], width, generator=g),
            torch.randn(batch, counts[i + 1], width, generator=g),
        )
        for i in range(len(model.blocks))
    ]


def native_forward(model: torch.nn.Module, x: torch.Tensor, tokens: list[tuple[torch.Tensor, ...]]) -> list:
    """The unpatched timm ViT's parts, each run on ``tokens`` (:func:`native_tokens`) of the
    count the patched block's part sees: no matching, no merging, no proportional attention.
    What those sizes cost on this CPU: the bound any merging method at this schedule can reach.
    Returns every part's output (so that a compiled version keeps them)."""
    out = [model.patch_embed(x)]  # the same embedding as every other row
    for block, (a, m) in zip(model.blocks, tokens, strict=True):
        out.append(a + block.ls1(block.attn(block.norm1(a))))
        out.append(m + block.ls2(block.mlp(block.norm2(m))))
    return out


NATIVE = "native"  # a setting key (timm): run native_forward at that setting's token counts


def _label(setting: dict | None) -> str:
    if setting is None:
        return "unpatched"
    label = ", ".join(f"{k}={v}" for k, v in setting.items() if k not in (WAY, NATIVE))
    if setting.get(NATIVE):
        return f"native at {label}'s token counts"
    ways = {"alone": ", merge step alone", "shared": f", merge step on {torch.get_num_threads()} threads"}
    return label + ways.get(setting.get(WAY), "")


# -- timing -------------------------------------------------------------------------------------


def run_case(case: str, args, spin: Spinner, log) -> list[str]:
    label, model, forward, inputs, settings = build(case, args.batch, args.quick)
    if args.merge_step_ways:  # beside each setting: the same with the merge step's way forced
        settings = [
            s
            for setting in settings
            for s in (setting, {**setting, WAY: "alone"}, {**setting, WAY: "shared"})
        ]
    counts, tokens = {}, {}
    if args.native and case == "timm":  # beside each setting: the unpatched blocks at its counts
        counts = {s["r"]: token_counts(model, s["r"], inputs["x"]) for s in settings if WAY not in s}
        tokens = {r: native_tokens(model, inputs["x"].shape[0], c) for r, c in counts.items()}
        settings = settings + [{"r": r, NATIVE: True} for r in counts]

    def run(setting: dict | None) -> None:
        if setting and setting.get(NATIVE):
            native_forward(model, inputs["x"], tokens[setting["r"]])
        else:
            forward(model, inputs)

    everything = [None, *settings]
    ideal = {}
    base_flops = None
    for setting in everything:
        configure(model, setting)
        f = flops(model, lambda m, i, setting=setting: run(setting), inputs)
        base_flops = f if setting is None else base_flops
        ideal[_label(setting)] = base_flops / f
    times = {(phase, _label(s)): [] for phase in ("idle", "busy") for s in everything}
    with torch.inference_mode():
        for setting in everything:  # warm-up
            configure(model, setting)
            run(setting)
        for rep in range(args.reps):
            for phase in ("idle", "busy"):
                if phase == "busy":
                    spin.resume()
                try:
                    for setting in everything:
                        configure(model, setting)
                        for _ in range(args.calls):  # --calls: a steady load over several calls
                            start = time.perf_counter()
                            run(setting)
                            times[(phase, _label(setting))].append(time.perf_counter() - start)
                finally:
                    if phase == "busy":
                        spin.pause()
            log(
                f"  {case} rep {rep + 1}/{args.reps}: "
                + ", ".join(f"{p}/{s} {v[-1]:.2f}s" for (p, s), v in times.items())
            )
    configure(model, None)
    rows = []
    for setting in settings:
        name = _label(setting)
        cells = []
        speedups = {}
        for phase in ("idle", "busy"):
            base = statistics.median(times[(phase, "unpatched")])
            speedups[phase] = base / statistics.median(times[(phase, name)])
            cells += [f"{base:.2f}", f"{speedups[phase]:.2f}x", f"{speedups[phase] / ideal[name]:.2f}"]
        rows.append(
            f"| {label} | {name} | {ideal[name]:.2f}x | {' | '.join(cells)} | "
            f"{speedups['busy'] / speedups['idle']:.2f} |"
        )
    return rows


HEADER = (
    "| model | setting | FLOP-ideal | idle: unpatched s | idle: speedup | idle: efficiency "
    "| busy: unpatched s | busy: speedup | busy: efficiency | busy/idle |"
)


def profile_case(case: str, args, spin: Spinner, rows: int = 15) -> None:
    """Top operators (self CPU) of one patched forward, with the spinner running."""
    from torch.profiler import ProfilerActivity, profile

    label, model, forward, inputs, settings = build(case, args.batch, args.quick)
    configure(model, settings[0])
    with torch.inference_mode():
        forward(model, inputs)
        spin.resume()
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                forward(model, inputs)
        finally:
            spin.pause()
    configure(model, None)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n{label}, {_label(settings[0])}, busy, {torch.get_num_threads()} threads: "
          f"{sum(e.count for e in events)} profiler events, self CPU {total / 1e3:.0f} ms")  # fmt: skip
    print("| operator | self CPU ms | % | calls |\n|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3:.1f} | "
              f"{100 * e.self_cpu_time_total / total:.1f} | {e.count} |")  # fmt: skip


# -- the merge step before this change (bit-identical results), for --merge-step -----------------


def _old_normalize(metric: torch.Tensor) -> torch.Tensor:
    metric = metric.float()
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return unit.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _old_merge(plan: M.MergePlan, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The float ``mean`` / ``mlerp`` merge as it was: three gathers, a masked fill, a 2-d
    ``index_add_`` (a sort-based parallel scatter on CPU) and two separate norms."""
    B, N = x.shape[:2]
    gather = M._gather_tokens
    moved = gather(x, plan.src)
    empty = plan.in_sizes.gather(1, plan.src) == 0
    moved = moved.masked_fill(empty[..., None], 0)
    target = gather(x, plan.kept.gather(1, plan.dst))
    out = gather(x, plan.kept)
    weight = plan.in_sizes.gather(1, plan.src) / plan.sizes.gather(1, plan.dst).clamp_min(1e-12)
    term = (moved - target) * weight[..., None]
    out.view(B * (N - plan.r), -1).index_add_(0, M._rows(plan.dst, N - plan.r), term.view(B * plan.r, -1))
    if mode == "mlerp":
        kept = N - plan.r
        moved_norm, target_norm = moved.norm(dim=-1), target.norm(dim=-1)
        largest = out.new_zeros((B, kept)).scatter_reduce(
            1, plan.dst, torch.maximum(moved_norm, target_norm), reduce="amax"
        )
        rows = gather(out, plan.dst)
        scale = largest.gather(1, plan.dst) / rows.norm(dim=-1).clamp_min(1e-6)
        out.view(B * kept, -1).index_copy_(
            0, M._rows(plan.dst, kept), (rows * scale[..., None]).flatten(0, 1)
        )
    return out


def _step(keys: torch.Tensor, x: torch.Tensor, r: int, old: bool, mode: str) -> torch.Tensor:
    history = M.start_history(x.shape[0], x.shape[1])
    if old:
        new_normalize, M._normalize = M._normalize, _old_normalize
        try:
            plan = M.bipartite_soft_matching(keys, r, history, 1)
        finally:
            M._normalize = new_normalize
        M.advance(history, plan)
        return _old_merge(plan, x, mode)
    plan = M.bipartite_soft_matching(keys, r, history, 1)
    M.advance(history, plan)
    return M.merge(plan, x, mode)


def _op_counts(fn: Callable[[], object]) -> tuple[int, int]:
    """Profiler events of one call, and ops with an input of >= GRAIN elements."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    events = prof.events()
    large = sum(
        1
        for e in events
        if e.name.startswith("aten::")
        and any(isinstance(s, list) and s and math.prod(s) >= GRAIN for s in e.input_shapes)
        and not any(v in e.name for v in ("view", "slice", "select", "as_strided", "expand", "reshape",
                                           "transpose", "unsqueeze", "flatten", "empty", "_to_copy", "aten::to"))
    )  # fmt: skip
    return len(events), large


def merge_step_report(args) -> None:
    g = torch.Generator().manual_seed(0)
    B, N, C, H = args.batch, 257, 384, 6
    keys = torch.randn(B, N, H, 64, generator=g).mean(dim=-2)
    x = torch.randn(B, N, C, generator=g)
    print(
        f"merge step, ViT-S at 224 px: B={B}, N={N}, C={C}, keys of 64, protected 1 (matching + advance + merge)\n"
    )
    print(
        "| r | mode | version | events | large ops | ms/step, 1 thread (thread CPU) | other thread ms/step at 2 threads |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in (16, 32):
        for mode in ("mean", "mlerp"):
            new, old = _step(keys, x, r, False, mode), _step(keys, x, r, True, mode)
            assert torch.equal(new, old), "old and new merge steps differ"
            results = {}
            for version in ("old", "new"):
                fn = lambda v=version, r=r, mode=mode: _step(keys, x, r, v == "old", mode)  # noqa: E731
                results[version] = [*_op_counts(fn), [], []]
            with torch.inference_mode():
                for _ in range(args.reps * 2 + 3):  # interleaved rounds of 10 steps
                    for version in ("old", "new"):
                        fn = lambda v=version, r=r, mode=mode: _step(keys, x, r, v == "old", mode)  # noqa: E731
                        for threads, slot in ((1, 2), (2, 3)):
                            torch.set_num_threads(threads)
                            fn()
                            t0, p0 = time.thread_time(), time.process_time()
                            for _ in range(10):
                                fn()
                            t1, p1 = time.thread_time(), time.process_time()
                            results[version][slot].append(
                                (t1 - t0) / 10 if threads == 1 else (p1 - p0 - (t1 - t0)) / 10
                            )
            torch.set_num_threads(args.threads)
            for version in ("old", "new"):
                events, large, one, other = results[version]
                print(f"| {r} | {mode} | {version} | {events} | {large} | {1e3 * statistics.median(one):.3f} | "
                      f"{1e3 * statistics.median(other):.3f} |")  # fmt: skip


# -- strong schedules against the reference, one thread, CPU time ------------------------------


def strong_report(args) -> None:
    """timm ViT-S/14 (DINOv2 layout, random weights) at 224 px, 1 thread, CPU seconds of the
    calling thread (``time.thread_time``: steadier than wall time on a shared machine): tome
    (``mlerp``, the default, and ``mode="mean"``, the original's rule) and the plain reference
    (``benchmarks/reference_tome.py``), each against the FLOP-ideal (FlopCounterMode); "native":
    the unpatched blocks run at the patched model's token counts, with no merging at all."""
    import timm

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reference_tome

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", img_size=224, pretrained=False).eval()
    x = {"x": torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))}
    forward = lambda m, i: m(i["x"])  # noqa: E731
    settings = [("unpatched", None, None)]
    for r in ((16, -1.0), (16, -0.75)):
        settings += [("tome mlerp", r, "mlerp"), ("tome mean", r, "mean"), ("reference", r, None)]
        settings += [("native", r, None)]
    counts = {r: token_counts(model, r, x["x"]) for r in ((16, -1.0), (16, -0.75))}
    tokens = {r: native_tokens(model, args.batch, c) for r, c in counts.items()}

    def native(r) -> None:
        native_forward(model, x["x"], tokens[r])

    def configure_strong(kind: str, r, mode) -> None:
        tome.unpatch(model)
        reference_tome.remove(model)
        if kind.startswith("tome"):
            tome.patch(model, r=r, mode=mode)
        elif kind == "reference":
            reference_tome.apply(model, r, trace_source=False)
        # "native" runs the unpatched blocks itself

    ideal, times = {}, {}
    base = None

    def run(kind: str, r) -> None:
        if kind == "native":
            native(r)
        else:
            forward(model, x)

    for kind, r, mode in settings:
        configure_strong(kind, r, mode)
        f = flops(model, lambda m, i, kind=kind, r=r: run(kind, r), x)
        base = f if r is None else base
        ideal[(kind, r)] = base / f
        times[(kind, r)] = []
    with torch.inference_mode():
        for kind, r, mode in settings:
            configure_strong(kind, r, mode)
            run(kind, r)
        for rep in range(args.reps):
            for kind, r, mode in settings:
                configure_strong(kind, r, mode)
                start = time.thread_time()
                run(kind, r)
                times[(kind, r)].append(time.thread_time() - start)
            print(f"  rep {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
    configure_strong("unpatched", None, None)
    t0 = statistics.median(times[("unpatched", None)])
    print(f"timm ViT-S/14 (DINOv2 layout, random), 224 px, batch {args.batch}, 1 thread, thread CPU s, "
          f"medians of {args.reps} interleaved runs; unpatched {t0:.2f} s\n")  # fmt: skip
    print("| r | setting | FLOP-ideal | speedup | efficiency | tome / reference |\n|---|---|---|---|---|---|")
    for kind, r, _ in settings[1:]:
        t = statistics.median(times[(kind, r)])
        ref = statistics.median(times[("reference", r)])
        print(f"| {r} | {kind} | {ideal[(kind, r)]:.2f}x | {t0 / t:.2f}x | {t0 / t / ideal[(kind, r)]:.3f} | "
              f"{ref / t:.3f}x |")  # fmt: skip


def step_timings_report(args) -> None:
    """Each merge step's way and milliseconds, forward by forward, as the load comes and goes:
    timm ViT-S/14 (random) at 224 px, r=16, 4 idle forwards, 4 busy, then idle and busy in turn."""
    import timm

    from tome.core import threads

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", img_size=224, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tome.patch(model, r=16)
    steps: list[tuple[bool, float]] = []
    timed_exit = threads._Timed.__exit__  # a diagnostic: reads the picker's own record

    def recording_exit(self, *exc) -> None:
        timed_exit(self, *exc)
        steps.append((self.way, self.ways.timings[self.way][-1]))

    threads._Timed.__exit__ = recording_exit
    print(f"timm ViT-S/14 (random), 224 px, batch {args.batch}, r=16; A = alone, S = on torch's threads\n")
    try:
        with spinner() as spin, torch.inference_mode():
            for phase in ["idle"] * 4 + ["busy"] * 4 + ["idle", "busy"] * 3:
                if phase == "busy":
                    spin.resume()
                steps.clear()
                start = time.perf_counter()
                model(x)
                seconds = time.perf_counter() - start
                if phase == "busy":
                    spin.pause()
                ways = " ".join(f"{'A' if alone else 'S'}{1e3 * t:.1f}" for alone, t in steps)
                print(f"{phase} forward {seconds:.2f} s, steps ms: {ways}")
    finally:
        threads._Timed.__exit__ = timed_exit


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}"
    )
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5; quick 2)")
    parser.add_argument("--batch", type=int, default=None, help="batch (default 16; unet 1; quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small inputs and models, 2 reps")
    parser.add_argument("--profile", action="store_true", help="top ops of the patched forward, busy")
    parser.add_argument(
        "--merge-step-ways",
        action="store_true",
        help="beside each setting (the merge step picks its way by timing), the same with the merge "
        "step always alone on the calling thread, and always on torch's threads (as before)",
    )
    parser.add_argument(
        "--step-timings",
        action="store_true",
        help="each merge step's way and time as the load comes and goes",
    )
    parser.add_argument(
        "--calls",
        type=int,
        default=1,
        help="calls of each setting in a row within a phase, each timed (default 1: the load "
        "changes between every two calls of a setting; more: a steady load, as the merge step's "
        "thread picker meets it in a service that shares its machine for long)",
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="timm: beside each setting, the unpatched blocks run at its token counts (no merging)",
    )
    parser.add_argument(
        "--merge-step", action="store_true", help="old vs new merge step: op counts, CPU time"
    )
    parser.add_argument(
        "--strong", action="store_true", help="(16, -1.0) and (16, -0.75): tome vs reference, 1 thread"
    )
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
    args.reps = args.reps or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    threads = 1 if args.strong else args.threads
    env = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ)
    print(
        f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, load average {load:.2f}"
        + (f", {env}" if env else "")
    )
    if args.strong:
        args.batch = args.batch or 8
        strong_report(args)
        return
    if args.merge_step:
        args.batch = args.batch or 16
        merge_step_report(args)
        return
    if args.step_timings:
        args.batch = args.batch or 16
        step_timings_report(args)
        return
    start = time.perf_counter()
    rows = []
    with spinner() as spin:
        for case in cases:
            batch = args.batch or (2 if args.quick else (1 if case == "unet" else 16))
            case_args = argparse.Namespace(**{**vars(args), "batch": batch})
            if args.profile:
                profile_case(case, case_args, spin)
            else:
                log(f"{case} ({time.perf_counter() - start:.0f}s elapsed)")
                rows += run_case(case, case_args, spin, log)
    if rows:
        print(
            f"medians of {args.reps} interleaved repetitions x {args.calls} call(s) in a row per phase; "
            "busy = a spinning process on the other core\n"
        )
        print(HEADER)
        print("|" + "---|" * (HEADER.count("|") - 1))
        print("\n".join(rows))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{time.perf_counter() - start:.0f}s in all; load average at the end {load:.2f}")


if __name__ == "__main__":
    main()
