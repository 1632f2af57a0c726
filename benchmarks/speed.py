"""Speed of token merging on real ViTs, against the FLOP-ideal speedup and a reference ToMe.

One command, one process; prints a markdown table::

    python benchmarks/speed.py            # the full suite: ~13 minutes on 2 CPU cores
    python benchmarks/speed.py --quick    # a smoke run: ~30 s (DINOv2 timm at 224 px, batch 8, 2 reps)
    python benchmarks/speed.py --cases timm518,compile --reps 3     # a subset (see --help)
    python benchmarks/speed.py --profile 518:64   # torch.profiler tables instead of the table

Cases (``--cases``; ``--quick`` runs only the first, at batch 8):

- the shared DINOv2-S/14 (``../shared/models/dinov2-small-saliency``) in timm and in transformers
  (``Dinov2Model``, SDPA attention), at 224 px (257 tokens; r = 8, 13, 16, (16, -1.0)) and at
  518 px (1370 tokens; r = 64 and 102: 1.50x and 2.01x fewer FLOPs; batch 8 by default so the
  suite fits its time, ``--batch-518 32`` for the issue's setting);
- timm ViT-B/16 at 224 px (197 tokens) with random weights (speed does not depend on them);
- DINOv2-S/14 timm at 224 px, r = 16: ``torch.compile`` (inductor; the patched model with
  ``fullgraph=True``) next to eager, and bf16 under CPU autocast next to fp32.

Every repetition times each setting once (unpatched, ours per r, the reference per r) in turn,
so slow drifts of the machine hit all alike; the table shows medians. Inputs are random images:
speed does not depend on the pixels.

Columns:

- img/s: images per second, unpatched and patched (``tome.patch``), and speedup = their ratio;
- FLOP-ideal: FLOPs of the unpatched model / FLOPs with merging, counted from the tokens every
  block saw (``model.tome.tokens_per_layer``): block i with N tokens entering and M left after
  its merge costs qkv 6NC^2 + attention 4N^2C + proj 2NC^2 + MLP 4MCH (16MC^2 at MLP ratio 4),
  plus the patch embedding; efficiency = speedup / FLOP-ideal (1.0: merging is free);
- ref: speedup of ``benchmarks/reference_tome.py`` (the published algorithm written plainly:
  explicit attention with log-size bias, dense source matrix) at the same r on the same timm
  model, and ours/ref = our throughput / the reference's;
- match / merge / unmerge %: share of one forward pass spent in ``tome.core.merge``'s matching
  (``bipartite_soft_matching``), merging (``merge`` and source-map update ``advance``) and
  unmerging, timed by wrappers in a separate, untimed pass (the reference: its matching, its
  weighted average and dense source update);
- source MB: memory of source tracking: ours, every layer's history (``source`` (B, N0) int64 and
  ``sizes`` (B, N)) as held by the pass's state (``model.tome._last.histories``) after the pass;
  the reference, its largest dense (B, N, N0) float32 matrix.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import reference_tome  # noqa: E402

import tome  # noqa: E402
from tome.core import merge as M  # noqa: E402

DINOV2 = ROOT.parent / "shared" / "models" / "dinov2-small-saliency"
R_224 = [8, 13, 16, (16, -1.0)]
R_518 = [64, 102]  # 1.50x and 2.01x fewer FLOPs at 1370 tokens (DINOv2-S)
CASES = {
    "timm224": "DINOv2-S/14 timm, 224 px, r = 8, 13, 16, (16, -1.0), with the reference",
    "hf224": "DINOv2-S/14 transformers, 224 px, same r",
    "vitb224": "ViT-B/16 timm (random weights), 224 px, same r, with the reference",
    "timm518": "DINOv2-S/14 timm, 518 px, r = 64, 102, with the reference",
    "hf518": "DINOv2-S/14 transformers, 518 px, r = 64, 102",
    "bf16": "DINOv2-S/14 timm, 224 px, r = 16, bf16 CPU autocast, with the reference",
    "compile": "DINOv2-S/14 timm, 224 px, r = 16: torch.compile vs eager",
}


# -- models -------------------------------------------------------------------------------------


@dataclass
class Model:
    """A model to time, with what the FLOP count needs."""

    module: nn.Module
    family: str  # "timm" | "transformers"
    width: int  # C
    hidden: int  # MLP hidden width H
    depth: int
    patch: int
    size: int  # image side in pixels

    @property
    def tokens(self) -> int:
        return (self.size // self.patch) ** 2 + 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "transformers":
            return self.module(pixel_values=x).last_hidden_state
        return self.module(x)

    def flops(self, tokens: list[int]) -> float:
        """FLOPs of one image, given the tokens entering block 0 and left after each block."""
        C, H = self.width, self.hidden
        total = 2 * (self.tokens - 1) * 3 * self.patch**2 * C  # patch embedding
        for n, m in itertools.pairwise(tokens):
            total += 6 * n * C * C + 4 * n * n * C + 2 * n * C * C + 4 * m * C * H
        return float(total)


def dinov2_transformers(size: int) -> Model:
    from transformers import Dinov2Model

    module = Dinov2Model.from_pretrained(str(DINOV2)).eval()
    cfg = module.config
    hidden = int(cfg.hidden_size * cfg.mlp_ratio)
    return Model(module, "transformers", cfg.hidden_size, hidden, cfg.num_hidden_layers, cfg.patch_size, size)


def dinov2_timm(size: int) -> Model:
    from transformers import Dinov2Model

    from tome.tools.models.timm_from_hf import timm_dinov2_from_hf

    module = timm_dinov2_from_hf(Dinov2Model.from_pretrained(str(DINOV2)), img_size=size)
    return _timm_model(module, size)


def vit_b16_timm(size: int) -> Model:
    import timm

    torch.manual_seed(0)
    return _timm_model(timm.create_model("vit_base_patch16_224", pretrained=False).eval(), size)


def _timm_model(module: nn.Module, size: int) -> Model:
    hidden = module.blocks[0].mlp.fc1.out_features
    patch = module.patch_embed.patch_size[0]
    return Model(module, "timm", module.embed_dim, hidden, len(module.blocks), patch, size)


# -- settings -----------------------------------------------------------------------------------


@dataclass
class Setting:
    """One way to run a model: unpatched, ours at r, or the reference at r."""

    kind: str  # "unpatched" | "ours" | "reference"
    r: object = None
    run: Callable[[torch.Tensor], torch.Tensor] | None = None  # overrides model(x) (compiled)
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    shares: dict[str, float] = field(default_factory=dict)
    source_bytes: int = 0

    def configure(self, model: Model) -> None:
        tome.unpatch(model.module)
        if model.family == "timm":
            reference_tome.remove(model.module)
        if self.kind == "ours":
            tome.patch(model.module, r=self.r)
        elif self.kind == "reference":
            reference_tome.apply(model.module, self.r)

    def forward(self, model: Model, x: torch.Tensor) -> torch.Tensor:
        return self.run(x) if self.run is not None else model(x)

    def record(self, model: Model) -> None:
        """Token counts and source-tracking memory of the latest pass."""
        if self.kind == "ours":
            handle = model.module.tome
            self.tokens = list(handle.tokens_per_layer)
            self.source_bytes = _history_bytes(handle)
        elif self.kind == "reference":
            state = model.module._reference_tome
            self.tokens = list(state.tokens_per_layer)
            B = state.source.shape[0] if state.source is not None else 0
            self.source_bytes = max(B * n * self.tokens[0] * 4 for n in self.tokens[1:])
        else:
            self.tokens = [model.tokens] * (model.depth + 1)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _history_bytes(handle) -> int:
    """Bytes of every block's history (source and sizes) of the latest finished pass."""
    storages = {}
    for history in handle._last.histories:
        if history is not None:
            for t in (history.source, history.sizes):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


# -- timing ------------------------------------------------------------------------------------


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextlib.contextmanager
def _wrapped(module: object, names: dict[str, str], totals: dict[str, float]) -> Iterator[None]:
    """Replace ``module.<name>`` by a wrapper that adds its wall time to ``totals[category]``."""
    originals = {name: getattr(module, name) for name in names}

    def wrap(name: str, category: str):
        original = originals[name]

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[category] += time.perf_counter() - start

        return wrapper

    try:
        for name, category in names.items():
            setattr(module, name, wrap(name, category))
        yield
    finally:
        for name, original in originals.items():
            setattr(module, name, original)


OURS_PARTS = {"bipartite_soft_matching": "match", "merge": "merge", "advance": "merge", "unmerge": "unmerge"}
REFERENCE_PARTS = {"bipartite_soft_matching": "match", "merge_wavg": "merge", "merge_source": "merge"}


def measure_shares(setting: Setting, model: Model, x: torch.Tensor) -> None:
    """Share of a forward pass in matching / merging / unmerging (one extra, untimed pass)."""
    totals = {"match": 0.0, "merge": 0.0, "unmerge": 0.0}
    module, parts = (M, OURS_PARTS) if setting.kind == "ours" else (reference_tome, REFERENCE_PARTS)
    with _wrapped(module, parts, totals):
        total = _timed(lambda: setting.forward(model, x))
    setting.shares = {k: v / total for k, v in totals.items()}


def run_group(
    model: Model, settings: list[Setting], x: torch.Tensor, reps: int, autocast: bool = False, log=print
) -> None:
    """Warm up every setting, then ``reps`` interleaved timed passes of each; then shares."""
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), context:
        for setting in settings:
            setting.configure(model)
            setting.forward(model, x)  # warm-up (and compilation)
            setting.record(model)
        for rep in range(reps):
            for setting in settings:
                setting.configure(model)
                setting.times.append(_timed(lambda s=setting: s.forward(model, x)))
            log(f"    rep {rep + 1}/{reps}: " + ", ".join(f"{s.times[-1]:.2f}s" for s in settings))
        for setting in settings:
            if setting.kind != "unpatched" and setting.run is None:
                setting.configure(model)
                measure_shares(setting, model, x)
        tome.unpatch(model.module)
        if model.family == "timm":
            reference_tome.remove(model.module)


# -- table --------------------------------------------------------------------------------------

HEADER = (
    "| model | px | batch | mode | r | tokens | unpatched img/s | ToMe img/s | speedup | FLOP-ideal "
    "| efficiency | ref speedup | ours/ref | match % | merge % | unmerge % | source MB ours / ref |"
)


def _r_text(r: object) -> str:
    return f"({r[0]}, {r[1]})" if isinstance(r, tuple) else str(r)


def table_rows(name: str, model: Model, batch: int, mode: str, settings: list[Setting]) -> list[str]:
    base = next(s for s in settings if s.kind == "unpatched")
    references = {_r_text(s.r): s for s in settings if s.kind == "reference"}
    rows = []
    for ours in (s for s in settings if s.kind == "ours"):
        speedup = base.median / ours.median
        ideal = model.flops(base.tokens) / model.flops(ours.tokens)
        ref = references.get(_r_text(ours.r))
        ref_cells = ["–", "–"]
        ref_mb = "–"
        if ref is not None:
            ref_cells = [f"{base.median / ref.median:.2f}x", f"{ref.median / ours.median:.2f}x"]
            ref_mb = f"{ref.source_bytes / 2**20:.1f}"
        shares = [
            f"{100 * ours.shares[k]:.1f}" if ours.shares else "–" for k in ("match", "merge", "unmerge")
        ]
        rows.append(
            f"| {name} | {model.size} | {batch} | {mode} | {_r_text(ours.r)} | "
            f"{ours.tokens[0]}→{ours.tokens[-1]} | {batch / base.median:.1f} | {batch / ours.median:.1f} | "
            f"{speedup:.2f}x | {ideal:.2f}x | {speedup / ideal:.3f} | {' | '.join(ref_cells)} | "
            f"{' | '.join(shares)} | {ours.source_bytes / 2**20:.2f} / {ref_mb} |"
        )
    return rows


# -- the suite ----------------------------------------------------------------------------------


def eager_group(builder, size: int, batch: int, rs: list, reference: bool) -> tuple[Model, list[Setting]]:
    model = builder(size)
    settings = [Setting("unpatched")] + [Setting("ours", r) for r in rs]
    if reference and model.family == "timm":
        settings += [Setting("reference", r) for r in rs]
    return model, settings


def compiled_group(size: int, batch: int, r: object) -> tuple[Model, list[Setting], list[Setting]]:
    """Unpatched and patched DINOv2 timm, each eager and compiled (separate model instances, so
    each compiled graph sees one fixed configuration)."""
    plain, merged = dinov2_timm(size), dinov2_timm(size)
    tome.patch(merged.module, r=r)
    compiled_plain = torch.compile(plain.module)
    compiled_merged = torch.compile(merged.module, fullgraph=True)
    eager = [Setting("unpatched", run=plain.module), Setting("ours", r, run=merged.module)]
    compiled = [Setting("unpatched", run=compiled_plain), Setting("ours", r, run=compiled_merged)]
    return merged, eager, compiled


def run_fixed(model: Model, settings: list[Setting], x: torch.Tensor, reps: int, log=print) -> None:
    """Interleaved timing of settings that carry their own callables (no re-configuration)."""
    with torch.inference_mode():
        for setting in settings:
            start = time.perf_counter()
            setting.run(x)
            log(f"    warm-up {setting.kind}: {time.perf_counter() - start:.1f}s")
            if setting.kind == "ours":
                setting.record(model)
            else:
                setting.tokens = [model.tokens] * (model.depth + 1)
        for rep in range(reps):
            for setting in settings:
                setting.times.append(_timed(lambda s=setting: s.run(x)))
            log(f"    rep {rep + 1}/{reps}: " + ", ".join(f"{s.times[-1]:.2f}s" for s in settings))


def profile(model: Model, settings: list[Setting], x: torch.Tensor, rows: int = 25) -> None:
    """Self CPU time by operator of one forward pass per setting, side by side (torch.profiler):
    where the time goes, and which operators merging adds."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    times: list[dict[str, tuple[float, int]]] = []
    with torch.inference_mode():
        for setting in settings:
            setting.configure(model)
            setting.forward(model, x)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                setting.forward(model, x)
            times.append({e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()})
        tome.unpatch(model.module)
        if model.family == "timm":
            reference_tome.remove(model.module)
    names = [f"{s.kind} r={_r_text(s.r)}" if s.r is not None else s.kind for s in settings]
    print(f"| operator (self CPU ms, calls) | {' | '.join(names)} |")
    print("|---|" + "---|" * len(names))
    totals = [sum(ms for ms, _ in t.values()) for t in times]
    print("| **total** | " + " | ".join(f"**{total:.1f}**" for total in totals) + " |")
    ops = sorted(set().union(*times), key=lambda op: -sum(t.get(op, (0.0, 0))[0] for t in times))
    for op in ops[:rows]:
        cells = [f"{t[op][0]:.1f} ({t[op][1]})" if op in t else "–" for t in times]
        print(f"| {op} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: DINOv2 timm 224 only, batch 8, 2 reps"
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="timed repetitions per setting (default 5; quick 2)"
    )
    parser.add_argument("--batch", type=int, default=None, help="batch at 224 px (default 32; quick 8)")
    parser.add_argument("--batch-518", type=int, default=8, help="batch at 518 px (default 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated subset of {','.join(CASES)} (default: all; quick: timm224)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="PX:R",
        help="only print torch.profiler tables of DINOv2 timm at PX pixels: unpatched, ours and the "
        "reference at r = R (e.g. 518:64; batch: --batch, or --batch-518 at 518)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 5)
    batch = args.batch or (8 if args.quick else 32)
    torch.manual_seed(0)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    if args.profile:
        size, r = (int(v) for v in args.profile.split(":"))
        b = args.batch_518 if size == 518 else batch
        x = torch.randn(b, 3, size, size)
        profile(dinov2_timm(size), [Setting("unpatched"), Setting("ours", r), Setting("reference", r)], x)
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 unless noted; "
        f"medians of {reps} interleaved repetitions\n"
    )
    rows = []
    start = time.perf_counter()

    def eager(name: str, builder, size: int, b: int, rs: list, reference: bool = True) -> None:
        log(f"{name} @ {size} px, batch {b} ({time.perf_counter() - start:.0f}s elapsed)")
        model, settings = eager_group(builder, size, b, rs, reference)
        x = torch.randn(b, 3, size, size)
        run_group(model, settings, x, reps, log=log)
        rows.extend(table_rows(name, model, b, "eager fp32", settings))

    cases = args.cases.split(",") if args.cases else (["timm224"] if args.quick else list(CASES))
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
    b518 = args.batch_518
    if "timm224" in cases:
        eager("DINOv2-S/14 timm", dinov2_timm, 224, batch, R_224)
    if "hf224" in cases:
        eager("DINOv2-S/14 transformers", dinov2_transformers, 224, batch, R_224)
    if "vitb224" in cases:
        eager("ViT-B/16 timm (random)", vit_b16_timm, 224, batch, R_224)
    if "timm518" in cases:
        eager("DINOv2-S/14 timm", dinov2_timm, 518, b518, R_518)
    if "hf518" in cases:
        eager("DINOv2-S/14 transformers", dinov2_transformers, 518, b518, R_518)
    if "bf16" in cases:
        log(f"bf16 autocast ({time.perf_counter() - start:.0f}s elapsed)")
        model, settings = eager_group(dinov2_timm, 224, batch, [16], reference=True)
        x = torch.randn(batch, 3, 224, 224)
        run_group(model, settings, x, reps, autocast=True, log=log)
        rows.extend(table_rows("DINOv2-S/14 timm", model, batch, "eager bf16 autocast", settings))
    compile_note = ""
    if "compile" in cases:
        log(f"torch.compile ({time.perf_counter() - start:.0f}s elapsed)")
        model, eager_settings, compiled_settings = compiled_group(224, batch, 16)
        x = torch.randn(batch, 3, 224, 224)
        run_fixed(model, eager_settings + compiled_settings, x, reps, log=log)
        rows.extend(table_rows("DINOv2-S/14 timm", model, batch, "eager fp32", eager_settings))
        rows.extend(table_rows("DINOv2-S/14 timm", model, batch, "compiled fp32", compiled_settings))
        plain_gain = eager_settings[0].median / compiled_settings[0].median
        ours_gain = eager_settings[1].median / compiled_settings[1].median
        compile_note = (
            f"\ntorch.compile (inductor) vs eager, same run: unpatched {plain_gain:.2f}x, "
            f"ToMe r=16 (fullgraph) {ours_gain:.2f}x"
        )

    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    print("\n".join(rows))
    print(compile_note)
    print(f"\n{time.perf_counter() - start:.0f}s in all")


if __name__ == "__main__":
    main()
