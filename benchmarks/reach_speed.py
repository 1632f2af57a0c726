"""Speed of token merging on the newer families, one real-size configuration each, random weights.

One command, one process; prints a markdown table (progress goes to stderr)::

    python benchmarks/reach_speed.py                  # all five: ~12 minutes on 2 loaded CPU cores
    python benchmarks/reach_speed.py --cases clip --reps 2      # a subset (see --help)
    python benchmarks/reach_speed.py --ramp           # the (r, -1.0) ramp instead of a constant r

Configurations (the weights are random: speed does not depend on them; fp32, eval, SDPA attention
where the model lets one choose it):

- ``clip``: open_clip ``ViT-B-16`` image tower (``open_clip.create_model("ViT-B-16",
  pretrained=None)``, ``encode_image``) at 224 px: 196 patches + class token = 197 tokens; its
  blocks use ``nn.MultiheadAttention`` (unpatched: PyTorch's own path; patched: tome computes it
  with SDPA and the size bias);
- ``siglip``: transformers ``SiglipVisionModel``, SigLIP-B/16 at 384 px (hidden 768, 12 layers,
  12 heads, MLP 3072, patch 16): 576 tokens, no class token, attention-pooling head (fed the
  unmerged tokens);
- ``videomae``: transformers ``VideoMAEModel``, base config: 16 frames at 224 px, tubelet 2:
  8 x 14 x 14 = 1568 tokens, no class token;
- ``ast``: transformers ``ASTModel``, base config at 10 s (``max_length=1024`` frames, 128 mel
  bins, 16 x 16 patches with stride 10): 12 x 101 = 1212 patches + class and distillation
  tokens = 1214 tokens;
- ``eva``: timm ``Eva``, EVA-02-B/16 as the EVA-CLIP image tower (``eva02_base_patch16_clip_224``,
  ``num_classes=0``): 768 wide, 12 layers, axial RoPE, SwiGLU MLP (hidden 2048, three matrices)
  at 224 px: 196 patches + class token = 197 tokens; merged tokens rotate by the size-weighted
  mean of their patches' sin/cos (:mod:`tome.adapters.timm_eva`).

Schedule: for each configuration the constant ``r`` (or with ``--ramp`` the ``(r, -1.0)`` ramp)
whose FLOP-ideal speedup, computed from ``model.tome.planned_tokens(N)`` before any pass, is
closest to ``--target`` (default 2.0). The token counts of the warm-up pass
(``model.tome.tokens_per_layer``) are checked against the plan.

FLOP-ideal = FLOPs unpatched / FLOPs patched, counting a multiply-add as 2. A block with N tokens
entering and M left after its merge (tome merges between attention and MLP) costs
qkv 6Nd^2 + attention 4N^2d + proj 2Nd^2 + MLP 4MdH (= 24Nd^2 + 4N^2d when M = N and H = 4d);
the patch (tubelet) embedding, 2 x patches x (its input features) x d, and SigLIP's pooling head
(one probe query over the N0 unmerged tokens: 4N0d^2 + 4N0d + 4d^2 + 4dH) are counted at their
(unchanged) cost. A SwiGLU MLP (EVA-02: gate, value and output matrices) costs 6MdH. RoPE's
rotations are elementwise and not counted. Norms, softmax, GELU and the merging itself are not counted, so efficiency =
measured speedup / FLOP-ideal below 1 is what merging and the smaller matmuls cost in practice.

Timing: the speed suite's own loop (``benchmarks/speed.py``'s ``run_group``): one warm-up pass
per setting, then ``--reps`` repetitions that each time the unpatched model and the patched one in
turn (interleaved, so drifts of a shared machine hit both alike); the table shows medians, and the
range of the per-repetition speedups (unpatched time / patched time of the same repetition) shows
how noisy the machine was. Then one extra, untimed patched pass gives the share of the pass spent
in matching / merging / unmerging. The load average (``os.getloadavg()``) is printed before and
after each configuration: on a machine shared with other jobs the absolute times are not
comparable between runs, only the ratios within one.

Threads: on a machine whose load average exceeds its CPU count, every parallel region of PyTorch's
OpenMP pool waits for threads the scheduler has taken away, so many small operators (matching and
merging: ~0.1 ms each on one thread) each cost a scheduler time slice (~10 ms) with 2 threads, and
the measured speedup says more about the load than about merging. Measured here at load 6-7 on 2
CPUs: merging a (2, 197, 768) batch took 0.1 ms with 1 thread, 130 ms with 2; in two runs
each, the four configurations gave 1.14-1.53x and 0.84-1.35x with 2 threads, 1.84-2.02x and
1.93-2.32x with 1 (and the 1-thread passes were faster in absolute terms too). The speedup is the
ratio of the two medians, as in the speed suite; when the machine drifts during a run it can
differ from the per-repetition speedups (AST's 2.32x above: its per-repetition median was 1.99x). The run prints a note when that is the case; ``--threads 1``
measures what merging saves.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import speed  # noqa: E402  (the speed suite: Model, Setting, run_group, _r_text)

import tome  # noqa: E402

CASES = {
    "clip": "open_clip ViT-B-16 image tower, 224 px (197 tokens)",
    "siglip": "transformers SiglipVisionModel, SigLIP-B/16 at 384 px (576 tokens)",
    "videomae": "transformers VideoMAEModel base, 16 frames at 224 px, tubelet 2 (1568 tokens)",
    "ast": "transformers ASTModel base, 10 s: 1024 frames x 128 mel bins (1214 tokens)",
    "eva": "timm Eva, EVA-02-B/16 (EVA-CLIP image tower, RoPE, SwiGLU), 224 px (197 tokens)",
}
DEFAULT_BATCH = {"clip": 4, "siglip": 2, "videomae": 1, "ast": 1, "eva": 4}


@dataclass
class Reach(speed.Model):
    """A model of the speed suite's kind, with its own call, token count and FLOP count."""

    name: str = ""
    input: str = ""
    num_tokens: int = 0  # N0: tokens entering block 0
    protected: int = 0  # leading tokens never merged (class / distillation tokens)
    patch_in: int = 0  # input features of one patch (tubelet) embedding
    head_tokens: int = 0  # SigLIP's pooling head: the tokens it attends over (0: no such head)
    mlp_matrices: int = 2  # 2: fc1, fc2; 3: SwiGLU (gate, value, output)
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    make_input: Callable[[int], torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.num_tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(self.module, x)

    def flops(self, tokens: list[int]) -> float:
        """FLOPs of one sample, given the tokens entering block 0 and left after each block."""
        d, h = self.width, self.hidden
        total = 2 * (self.num_tokens - self.protected) * self.patch_in * d  # patch embedding
        for n, m in itertools.pairwise(tokens):
            total += 6 * n * d * d + 4 * n * n * d + 2 * n * d * d + 2 * self.mlp_matrices * m * d * h
        if self.head_tokens:
            t = self.head_tokens
            total += 4 * t * d * d + 4 * t * d + 4 * d * d + 4 * d * h
        return float(total)


# -- models -------------------------------------------------------------------------------------


def _hf(cls_name: str, config) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, cls_name)(config)
    model.set_attn_implementation("sdpa")
    return model.eval()


def clip_b16() -> Reach:
    import logging

    import open_clip

    torch.manual_seed(0)
    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded": intended
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    visual = model.visual
    block = visual.transformer.resblocks[0]
    return Reach(
        model, "open_clip", visual.transformer.width, block.mlp.c_fc.out_features,
        len(visual.transformer.resblocks), 16, 224,
        name="CLIP ViT-B/16 image tower (open_clip)", input="224 px",
        num_tokens=(224 // 16) ** 2 + 1, protected=1, patch_in=3 * 16 * 16,
        call=lambda m, x: m.encode_image(x), make_input=lambda b: torch.randn(b, 3, 224, 224),
        notes=[f"attention: {type(block.attn).__name__} (PyTorch's own path) unpatched, SDPA patched"],
    )  # fmt: skip


def siglip_b16_384() -> Reach:
    import transformers

    config = transformers.SiglipVisionConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        patch_size=16, image_size=384,
    )  # fmt: skip
    model = _hf("SiglipVisionModel", config)
    n = (384 // 16) ** 2
    return Reach(
        model, "transformers", 768, 3072, 12, 16, 384,
        name="SigLIP-B/16 vision (transformers)", input="384 px", num_tokens=n, protected=0,
        patch_in=3 * 16 * 16, head_tokens=n if config.vision_use_head else 0,
        call=lambda m, x: m(pixel_values=x).pooler_output,
        make_input=lambda b: torch.randn(b, 3, 384, 384),
        notes=[f"attention: {model.config._attn_implementation}"],
    )  # fmt: skip


def videomae_b() -> Reach:
    import transformers

    config = transformers.VideoMAEConfig()  # base: 768 x 12, 16 frames, 224 px, tubelet 2
    model = _hf("VideoMAEModel", config)
    c = config
    n = (c.num_frames // c.tubelet_size) * (c.image_size // c.patch_size) ** 2
    return Reach(
        model, "transformers", c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.patch_size,
        c.image_size, name="VideoMAE-B (transformers)",
        input=f"{c.num_frames} frames x {c.image_size} px, tubelet {c.tubelet_size}", num_tokens=n,
        protected=0, patch_in=c.num_channels * c.tubelet_size * c.patch_size**2,
        call=lambda m, x: m(pixel_values=x).last_hidden_state,
        make_input=lambda b: torch.randn(b, c.num_frames, 3, c.image_size, c.image_size),
        notes=[f"attention: {model.config._attn_implementation}"],
    )  # fmt: skip


def ast_b_10s() -> Reach:
    import transformers

    config = transformers.ASTConfig()  # base: 768 x 12, max_length 1024, 128 mel bins, stride 10
    model = _hf("ASTModel", config)
    c = config
    f_dim = (c.num_mel_bins - c.patch_size) // c.frequency_stride + 1
    t_dim = (c.max_length - c.patch_size) // c.time_stride + 1
    return Reach(
        model, "transformers", c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.patch_size, 0,
        name="AST-B (transformers)",
        input=f"10 s: {c.max_length} frames x {c.num_mel_bins} mel ({f_dim} x {t_dim} patches)",
        num_tokens=f_dim * t_dim + 2, protected=2, patch_in=c.patch_size**2,
        call=lambda m, x: m(input_values=x).last_hidden_state,
        make_input=lambda b: torch.randn(b, c.max_length, c.num_mel_bins),
        notes=[f"attention: {model.config._attn_implementation}"],
    )  # fmt: skip


def eva02_b16() -> Reach:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("eva02_base_patch16_clip_224", pretrained=False, num_classes=0).eval()
    block = model.blocks[0]
    hidden = block.mlp.fc2.in_features
    return Reach(
        model, "timm", model.embed_dim, hidden, len(model.blocks), 16, 224,
        name="EVA-02-B/16 (timm Eva, RoPE)", input="224 px", num_tokens=(224 // 16) ** 2 + 1,
        protected=model.num_prefix_tokens, patch_in=3 * 16 * 16, mlp_matrices=3,
        call=lambda m, x: m(x), make_input=lambda b: torch.randn(b, 3, 224, 224),
        notes=[
            f"attention: {type(block.attn).__name__} (fused SDPA: {block.attn.fused_attn}), "
            f"rope {type(model.rope).__name__}, MLP {type(block.mlp).__name__} (hidden {hidden})"
        ],
    )  # fmt: skip


BUILDERS = {
    "clip": clip_b16,
    "siglip": siglip_b16_384,
    "videomae": videomae_b,
    "ast": ast_b_10s,
    "eva": eva02_b16,
}


# -- schedule -----------------------------------------------------------------------------------


def planned(model: Reach, r: object) -> list[int]:
    """Token counts of schedule ``r`` (no forward pass), with the cap warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tome.patch(model.module, r=r)
        counts = model.module.tome.planned_tokens(model.num_tokens)
        tome.unpatch(model.module)
    return counts


def choose_r(model: Reach, target: float, ramp: bool) -> tuple[object, list[int], float]:
    """The constant r (or ramp (r, -1.0)) whose FLOP-ideal speedup is closest to ``target``."""
    full = model.flops([model.num_tokens] * (model.depth + 1))
    best = None
    limit = (model.num_tokens - model.protected) // 2
    for value in range(1, limit + 1):
        r = (value, -1.0) if ramp else value
        counts = planned(model, r)
        ideal = full / model.flops(counts)
        if best is None or abs(ideal - target) < abs(best[2] - target):
            best = (r, counts, ideal)
        if ideal > target:
            break  # the ideal grows with r: nothing further is closer
    return best


# -- the run ------------------------------------------------------------------------------------

HEADER = (
    "| model | input | batch | tokens | r | tokens left | unpatched s | ToMe s | FLOP-ideal "
    "| measured speedup | efficiency | per-rep speedups | match / merge / unmerge % |"
)


def _load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per setting (default 5)")
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)} (default: all)"
    )
    parser.add_argument(
        "--target", type=float, default=2.0, help="FLOP-ideal speedup to aim for (default 2.0)"
    )
    parser.add_argument("--ramp", action="store_true", help="choose among (r, -1.0) ramps, not constant r")
    parser.add_argument(
        "--batch", default=None, metavar="CASE=B,...",
        help="batch sizes, e.g. clip=8,ast=2 (default " + ",".join(f"{k}={v}" for k, v in DEFAULT_BATCH.items()) + ")",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
    batches = dict(DEFAULT_BATCH)
    for item in (args.batch or "").split(","):
        if item:
            key, _, value = item.partition("=")
            if key not in CASES or not value.isdigit():
                parser.error(f"--batch: expected CASE=B with CASE in {', '.join(CASES)}, got {item!r}")
            batches[key] = int(value)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs, fp32, "
        f"random weights; medians of {args.reps} interleaved repetitions after a warm-up; "
        f"schedule: {'(r, -1.0) ramp' if args.ramp else 'constant r'} closest to {args.target:.2f}x "
        f"FLOP-ideal\nload average (1 / 5 / 15 min) at start: {_load()}"
    )
    if torch.get_num_threads() > 1 and os.getloadavg()[0] > (os.cpu_count() or 1):
        print(
            f"note: load average above the {os.cpu_count()} CPUs with {torch.get_num_threads()} torch "
            "threads: every parallel region waits for descheduled threads, which hits the many small "
            "merging operators hardest; --threads 1 measures what merging saves"
        )
    print()
    rows, notes = [], []
    start = time.perf_counter()
    for case in cases:
        load_before = _load()
        log(f"{case}: building ({time.perf_counter() - start:.0f}s elapsed, load {load_before})")
        model = BUILDERS[case]()
        r, counts, ideal = choose_r(model, args.target, args.ramp)
        b = batches[case]
        log(
            f"  r = {speed._r_text(r)}: {counts[0]} -> {counts[-1]} tokens, FLOP-ideal {ideal:.2f}x; batch {b}"
        )
        torch.manual_seed(0)
        x = model.make_input(b)
        settings = [speed.Setting("unpatched"), speed.Setting("ours", r)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the cap warning of the schedule: planned for
            speed.run_group(model, settings, x, args.reps, log=log)
        base, ours = settings
        if ours.tokens != counts:
            raise RuntimeError(f"{case}: the pass gave {ours.tokens} tokens, the plan {counts}")
        if base.tokens[0] != model.num_tokens:
            raise RuntimeError(f"{case}: expected {model.num_tokens} tokens, got {base.tokens[0]}")
        speedup = base.median / ours.median
        ideal = model.flops(base.tokens) / model.flops(ours.tokens)
        per_rep = [u / p for u, p in zip(base.times, ours.times, strict=True)]
        shares = " / ".join(f"{100 * ours.shares[k]:.1f}" for k in ("match", "merge", "unmerge"))
        rows.append(
            f"| {model.name} | {model.input} | {b} | {model.num_tokens} | {speed._r_text(r)} | "
            f"{ours.tokens[-1]} | {base.median:.2f} | {ours.median:.2f} | {ideal:.2f}x | {speedup:.2f}x | "
            f"{speedup / ideal:.3f} | {min(per_rep):.2f}–{max(per_rep):.2f}x | {shares} |"
        )
        notes.append(
            f"- {model.name}: {'; '.join(model.notes)}; tokens after each block "
            f"{'→'.join(map(str, ours.tokens))}; load average before / after: {load_before} → {_load()}"
        )
        del model, x

    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    print("\n".join(rows))
    print()
    print("\n".join(notes))
    print(f"\nload average (1 / 5 / 15 min) at end: {_load()}; {time.perf_counter() - start:.0f}s in all")


if __name__ == "__main__":
    main()
