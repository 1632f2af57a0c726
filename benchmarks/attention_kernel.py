"""Proportional attention's two kernels side by side: a patched timm ViT-S/14 (DINOv2-S's layout,
random weights) with ``attention_kernel="sdpa"`` (log size as SDPA's float mask) and ``"flex"``
(FlexAttention, log size added by a ``score_mod``), beside the unpatched model.

    python benchmarks/attention_kernel.py              # CUDA if present (fp16, bf16), else CPU fp32
    python benchmarks/attention_kernel.py --quick      # 56 px, batch 2, 1 round: the wiring only

Cases: 224 px at r=16 and 518 px at r=64 (1370 tokens: attention is a larger share there).
Batch 16 / 4 on the CPU, 64 / 16 on CUDA. Eager models (FlexAttention compiled once, on its
first call, with dynamic shapes); one warm-up each (the compilation), then ``--reps`` rounds of
all settings in turn; medians. Also printed: the largest difference between the two kernels'
outputs (the same merges, so only float rounding).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tome  # noqa: E402

HEADER = "| px | batch | dtype | r | tokens | unpatched ms | sdpa ms | flex ms | flex speedup | max diff |"


def _vit(size: int, tiny: bool) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    width, depth, heads = (32, 2, 2) if tiny else (384, 12, 6)
    return timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=size, num_classes=0,
        embed_dim=width, depth=depth, num_heads=heads,
    ).eval()  # fmt: skip


def _seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def case(
    size: int, batch: int, r: int, dtype: torch.dtype, device: torch.device, reps: int, tiny: bool
) -> str:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    models = {"unpatched": _vit(size, tiny).to(device, dtype)}
    for kernel in ("sdpa", "flex"):
        models[kernel] = tome.patch(_vit(size, tiny).to(device, dtype), r=r, attention_kernel=kernel)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        outputs = {name: model(x) for name, model in models.items()}  # warm-up (flex compiles)
        for _ in range(reps):
            for name, model in models.items():
                times[name].append(_seconds(lambda model=model: model(x), device))
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    tokens = models["sdpa"].tome.tokens_per_layer
    diff = (outputs["flex"].float() - outputs["sdpa"].float()).abs().max().item()
    return (
        f"| {size} | {batch} | {str(dtype)[6:]} | {r} | {tokens[0]}→{tokens[-1]} | {ms['unpatched']:.1f} | "
        f"{ms['sdpa']:.1f} | {ms['flex']:.1f} | {ms['sdpa'] / ms['flex']:.2f}x | {diff:.1e} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="56 px, batch 2, 1 round: the wiring only")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtypes = (torch.float16, torch.bfloat16) if cuda else (torch.float32,)
    cases = [(224, 64 if cuda else 16, 16), (518, 16 if cuda else 4, 64)]
    if args.quick:
        cases, args.reps = [(56, 2, 2)], 1
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    rows = []
    for size, batch, r in cases:
        for dtype in dtypes:
            print(f"  {size} px {str(dtype)[6:]} ...", file=sys.stderr, flush=True)
            rows.append(case(size, batch, r, dtype, device, args.reps, args.quick))
    print(f"\nViT-S/14 timm, random weights; {name}; torch {torch.__version__}; medians of {args.reps}\n")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
