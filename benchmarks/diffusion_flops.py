"""FLOP-ideal speedup of token merging in the diffusion denoisers of ``benchmarks/diffusion.py``:
unpatched FLOPs / patched FLOPs, counted on the real (patched) forward, same inputs.

    python benchmarks/diffusion_flops.py            # docs/diffusion.md's FLOP table (about a minute)
    python benchmarks/diffusion_flops.py --real     # the same counts on real tensors (slow)

Models, inputs and settings are ``benchmarks/diffusion.py``'s: the rows of its ``SUITE`` (same
layouts, batch and first-layers truncation), then the DiTs and SDXL at full depth (FLOPs cost
nothing to count). Settings: tomesd's defaults (self-attention merged only; ``max_downsample``
1, 2 for SDXL) at ratio 0.3, 0.5 and 0.7, and ratio 0.5 with ``merge_mlp=True``.

How it counts: ``torch.utils.flop_counter.FlopCounterMode`` around one forward (2 FLOPs per
multiply-add: matrix products, ``addmm``/``bmm``/convolutions; elementwise ops, norms, softmax and
tome's gathers/scatters count nothing). On CPU, torch 2.14's counter does **not** count
``scaled_dot_product_attention``: it dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``,
which has no formula in ``torch.utils.flop_counter`` (it counts 0). This script gives it torch's own
formula for the other SDPA kernels (``sdpa_flop_count``: ``4 * B * H * Nq * Nk * D`` from the
query/key/value shapes), unless a later torch registers one. By default the forward runs under
``FakeTensorMode`` (shapes only: the same Python code, ops and shapes, no arithmetic), so even the
full-depth models count in seconds; ``--real`` runs the forwards on real CPU tensors instead
(``tests/test_diffusion_flops.py`` checks both count the same on tiny models). Flux's patched
forward reads its ``img_ids`` on the host once to find the patch grid, which fake tensors cannot
give: the script fills that one-entry cache with the grid ``build`` made (real runs read it).

Columns of the first table:

- GFLOPs unpatched / patched: one denoiser forward of the whole batch; patched = the model's ops
  only, without tome's matching (the similarity ``A x B`` product), which has its own column;
- FLOP-ideal: unpatched / patched (what a merge could give if time followed FLOPs and the merge
  bookkeeping were free); with matching: unpatched / (patched + matching).

The second table splits the unpatched FLOPs by the block ops that each setting merges
(self-attention: ``attn1``, the joint attention of SD3/Flux with its text part; cross-attention:
``attn2``; MLP: the feed-forwards of the image tokens, and Flux's single-block ``proj_mlp`` and
``proj_out``) and the rest (convolutions, embeddings, adaLN modulation, text MLPs, output layers):
"if free" is unpatched / (unpatched - self-attention): the ceiling of merging self-attention only,
at any ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusion as bench  # benchmarks/diffusion.py: the same models and inputs

from tome.adapters import diffusers_dit as tome_dit
from tome.adapters.common import diffusion as tome_diffusion

aten = torch.ops.aten
# the CPU kernel behind F.scaled_dot_product_attention (torch 2.14 has no FLOP formula for it)
CPU_SDPA = aten._scaled_dot_product_flash_attention_for_cpu


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


CUSTOM = {} if CPU_SDPA in flop_counter.flop_registry else {CPU_SDPA: _cpu_sdpa_flops}

# which group each merge setting's ops belong to (tome.adapters.diffusers_unet / diffusers_dit)
GROUPS = {"merge_attn": "self-attention", "rope": "self-attention", "merge_crossattn": "cross-attention",
          "merge_mlp": "MLP"}  # fmt: skip
BLOCK_OPS = {**tome_dit.BLOCKS, "BasicTransformerBlock": tome_diffusion.OPS}

# (label, ratio, options beyond the model's base options)
SETTINGS = [
    ("0.3", 0.3, {}),
    ("0.5", 0.5, {}),
    ("0.7", 0.7, {}),
    ("0.5, merge_mlp", 0.5, {"merge_mlp": True}),
]
# (model, latent, batch, layers): benchmarks/diffusion.py's SUITE rows, then full depth
ROWS = [(row[0], row[1], row[2], row[5]) for row in bench.SUITE]
ROWS += [("sdxl", 128, 2, None), ("pixart", 128, 2, None), ("sd3", 128, 2, None), ("flux", 128, 1, None)]


@dataclass
class Count:
    total: int  # the model's FLOPs (matching excluded)
    matching: int = 0  # tome's matching
    groups: dict[str, int] = field(default_factory=dict)  # FLOPs in the ops each setting merges


@contextlib.contextmanager
def _matching_flops(counter: flop_counter.FlopCounterMode, total: list[int]) -> Iterator[None]:
    original = tome_diffusion.random2d_matching

    def wrapper(*args, **kwargs):
        before = counter.get_total_flops()
        try:
            return original(*args, **kwargs)
        finally:
            total[0] += counter.get_total_flops() - before

    tome_diffusion.random2d_matching = wrapper
    try:
        yield
    finally:
        tome_diffusion.random2d_matching = original


def _groups(net: torch.nn.Module, counts: dict[str, dict]) -> dict[str, int]:
    root = type(net).__name__
    out = dict.fromkeys(("self-attention", "cross-attention", "MLP"), 0)
    for name, module in net.named_modules():
        kind = next((c.__name__ for c in type(module).__mro__ if c.__name__ in BLOCK_OPS), None)
        for op, flag in BLOCK_OPS.get(kind, ()):
            out[GROUPS[flag]] += sum(counts.get(f"{root}.{name}.{op}", {}).values())
    return out


def count(net: torch.nn.Module, inputs: dict) -> Count:
    """The FLOPs of one forward of ``net`` (as ``benchmarks/diffusion.py`` calls it)."""
    first, *rest = inputs
    matching = [0]
    with (
        torch.no_grad(),
        flop_counter.FlopCounterMode(display=False, custom_mapping=CUSTOM) as counter,
        _matching_flops(counter, matching),
    ):
        net(inputs[first], **{k: inputs[k] for k in rest})
    groups = _groups(net, counter.get_flop_counts())
    return Count(counter.get_total_flops() - matching[0], matching[0], groups)


def count_row(model: str, latent: int, batch: int, layers: int | None, settings=SETTINGS, real: bool = False):
    """``(depth note, unpatched Count, [(label, Count)])`` for one model and size."""
    with contextlib.nullcontext() if real else torch._subclasses.fake_tensor.FakeTensorMode():
        net, inputs, max_downsample, note = bench.build(model, latent, batch, layers)
        base = {"max_downsample": max_downsample} if model in ("sd15", "sdxl") else {}
        unpatched = count(net, inputs)
        patched = []
        for label, ratio, options in settings:
            bench.set_state(net, "tome", ratio, {**base, **options})
            if model == "flux" and not real:  # the grid of img_ids (build's: latent / 2 squared)
                net.tome._grid_cache = (weakref.ref(inputs["img_ids"]), (latent // 2, latent // 2))
            patched.append((label, count(net, inputs)))
        bench.set_state(net, "unpatched", 0.0, {})
    return note, unpatched, patched


def _part(model: str, note: str) -> str:
    return f"{bench.NAMES[model]} ({note or 'all'})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="count on real CPU tensors (slow)")
    parser.add_argument("--model", choices=sorted(bench.NAMES), help="only this model's rows")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = [row for row in ROWS if args.model in (None, row[0])]
    results = [(row, *count_row(*row, real=args.real)) for row in rows]
    sdpa = "torch's own formula" if not CUSTOM else "sdpa_flop_count, added for the CPU kernel"
    print(
        f"FLOPs of one forward ({'real' if args.real else 'fake'} tensors, torch {torch.__version__}, "
        f"FlopCounterMode; SDPA: {sdpa})\n"
    )
    print("| model (counted part) | px | batch | setting | GFLOPs unpatched | GFLOPs patched | "
          "matching GFLOPs | FLOP-ideal | with matching |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for (model, latent, batch, _), note, unpatched, patched in results:
        for label, c in patched:
            print(
                f"| {_part(model, note)} | {latent * 8} | {batch} | {label} | {unpatched.total / 1e9:.1f} | "
                f"{c.total / 1e9:.1f} | {c.matching / 1e9:.1f} | {unpatched.total / c.total:.2f}x | "
                f"{unpatched.total / (c.total + c.matching):.2f}x |"
            )
    print("\nUnpatched FLOPs by the block ops each setting merges:\n")
    print("| model (counted part) | px | GFLOPs | self-attention | cross-attention | MLP | other | "
          "ideal if self-attention were free |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for (model, latent, _, _), note, unpatched, _ in results:
        total, groups = unpatched.total, unpatched.groups
        other = total - sum(groups.values())
        shares = " | ".join(f"{100 * v / total:.0f}%" for v in (*groups.values(), other))
        free = total / (total - groups["self-attention"])
        print(f"| {_part(model, note)} | {latent * 8} | {total / 1e9:.1f} | {shares} | {free:.2f}x |")
    print(f"\n{time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
