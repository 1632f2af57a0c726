"""The speed suite on one CUDA GPU: ViTs eager and compiled in fp16 / bf16, a VLM prefill and a
diffusion UNet, in one command of a few minutes; prints one markdown table with the card's name.

    python benchmarks/gpu_suite.py                 # on a machine with CUDA (~3-5 min on one H100)
    python benchmarks/gpu_suite.py --no-compile    # eager only (skips inductor's compilations)
    python benchmarks/gpu_suite.py --dry-run       # tiny shapes on the CPU: checks the wiring only

Without CUDA (and without ``--dry-run``) it stops at once, saying so. Random weights throughout
(speed does not depend on them; the schedules fix the token counts). Cases:

- ``vit``: ViT-S/14 with DINOv2-S's layout (384 wide, 12 blocks), timm ``vit_small_patch14_dinov2``
  at 224 px (257 tokens, batch 64) and 518 px (1370 tokens, batch 16), and transformers
  ``Dinov2Model`` (SDPA) at 224 px; r = 16 and (16, -0.75) at 224 px, r = 64 and (64, -0.75) at
  518 px (r = 16 would remove 12% of 1370 tokens); the model and input cast to fp16 and to bf16,
  eager, and at 224 px in bf16 also ``torch.compile``'d (inductor; the patched models
  ``fullgraph=True``; one dtype and size only: each patched block compiles on its own, and more
  compilations would not fit the few minutes). FLOP-ideal as ``benchmarks/speed.py`` counts
  it (from ``model.tome.tokens_per_layer``); efficiency = speedup / FLOP-ideal.
- ``vlm``: ``benchmarks/vlm.py``'s LLaVA-1.5-7B layout (CLIP ViT-L/14-336, 576 visual tokens,
  a Vicuna-7B language model), full depth (24 + 32 layers), bf16, batch 1: the prefill
  (``generate(max_new_tokens=1)``) unpatched and with ``tome.patch(llava, visual_tokens=64)``;
  FLOP-ideal from ``vlm.flops``.
- ``flex``: proportional attention's two kernels, SDPA with a float mask and FlexAttention
  (``attention_kernel="flex"``), on the timm ViT at 224 and 518 px in fp16 and bf16
  (``benchmarks/attention_kernel.py``; its own table).
- ``unet``: SD 1.5's ``UNet2DConditionModel`` (default config) at 512 px (64 x 64 latents),
  batch 2, fp16, 77 text tokens: one denoiser call unpatched and at ``ratio=0.5``, eager.

Timing: CUDA events around each call after ``torch.cuda.synchronize()``; one untimed warm-up
(and compilation) per setting, then ``--reps`` rounds, each running every setting of a case once
in turn (interleaved); medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import attention_kernel  # noqa: E402
import speed  # noqa: E402
import vlm  # noqa: E402

import tome  # noqa: E402

START = time.perf_counter()  # for the progress lines
HEADER = "| case | px | batch | dtype | mode | setting | tokens | unpatched ms | ToMe ms | speedup | FLOP-ideal | efficiency |"


class Timer:
    """Times one call: CUDA events on a GPU, ``perf_counter`` on the CPU (the dry run)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        """Seconds of ``fn()``."""
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1e3


Setting = tuple[Callable[[], object] | None, Callable[[], object]]  # (untimed preparation, timed call)


def interleaved(settings: dict[str, Setting], reps: int, timer: Timer, log) -> dict[str, float]:
    """Median seconds of each setting's call: a warm-up each, then ``reps`` rounds of all in
    turn; each setting's preparation (patching) runs untimed before each of its calls."""

    def timed(setting: Setting) -> float:
        prepare, call = setting
        if prepare is not None:
            prepare()
        return timer(call)

    for name, setting in settings.items():
        log(f"    warm-up {name}: {timed(setting):.2f}s")
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(reps):
        for name, setting in settings.items():
            times[name].append(timed(setting))
    return {name: statistics.median(t) for name, t in times.items()}


def _switch(model: torch.nn.Module, **settings) -> Callable[[], None]:
    """Preparation: the model unpatched, then patched with ``settings`` (none: left unpatched)."""

    def prepare() -> None:
        tome.unpatch(model)
        if settings:
            tome.patch(model, **settings)

    return prepare


# -- ViTs ---------------------------------------------------------------------------------------


def vit(family: str, size: int, tiny: bool) -> speed.Model:
    """ViT-S/14 (DINOv2-S's layout) at ``size`` px, random weights; ``tiny``: 32 wide, 2 blocks."""
    torch.manual_seed(0)
    width, depth, heads = (32, 2, 2) if tiny else (384, 12, 6)
    if family == "timm":
        import timm

        module = timm.create_model(
            "vit_small_patch14_dinov2",
            pretrained=False,
            img_size=size,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
        )
        return speed._timm_model(module.eval(), size)
    import transformers

    config = transformers.Dinov2Config(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, patch_size=14, image_size=size
    )
    module = transformers.Dinov2Model(config).eval()
    module.set_attn_implementation("sdpa")
    return speed.Model(module, "transformers", width, 4 * width, depth, 14, size)


def vit_case(family, size, batch, schedules, dtype, compiled, device, args, timer, log) -> list[str]:
    """Rows for one ViT, one size, one dtype, eager or compiled: unpatched and each schedule."""
    mode = "compiled" if compiled else "eager"
    log(f"  ViT-S/14 {family} {size}px {str(dtype)[6:]} {mode} ({time.perf_counter() - START:.0f}s elapsed)")
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    models: dict[object, speed.Model] = {}
    settings: dict[str, Setting] = {}
    for r in [0, *schedules]:
        model = vit(family, size, args.dry_run)
        model.module.to(device, dtype)
        if r:
            tome.patch(model.module, r=r)
        models[r] = model
        run = model
        if compiled:
            backend = "eager" if args.dry_run else "inductor"  # the dry run checks the wiring only
            run = speed.Model(
                torch.compile(model.module, fullgraph=bool(r), backend=backend), *_fields(model)
            )
        settings[str(r)] = (None, lambda run=run: run(x))  # one model per setting: no switching
    with torch.inference_mode():
        medians = interleaved(settings, args.reps, timer, log)
        tokens = {
            r: list(m.module.tome.tokens_per_layer) if r else [m.tokens] * (m.depth + 1)
            for r, m in models.items()
        }
    base, spec = medians["0"], models[0]
    rows = []
    for r in schedules:
        t = medians[str(r)]
        ideal = spec.flops(tokens[0]) / spec.flops(tokens[r])
        rows.append(
            f"| ViT-S/14 {family} | {size} | {batch} | {str(dtype)[6:]} | {mode} | r={speed._r_text(r)} | "
            f"{tokens[r][0]}→{tokens[r][-1]} | {1e3 * base:.2f} | {1e3 * t:.2f} | {base / t:.2f}x | "
            f"{ideal:.2f}x | {base / t / ideal:.3f} |"
        )
    return rows


def _fields(model: speed.Model) -> tuple:
    return model.family, model.width, model.hidden, model.depth, model.patch, model.size


# -- VLM prefill --------------------------------------------------------------------------------


def vlm_case(device, args, timer, log) -> list[str]:
    """LLaVA-1.5-7B layout prefill, unpatched and visual_tokens=64."""
    import transformers

    vision_layers, lm_layers = (1, 1) if args.dry_run else vlm.FULL_DEPTH
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    log(f"  LLaVA-1.5-7B layout, {vision_layers} + {lm_layers} layers, {str(dtype)[6:]}")
    vision, text = dict(vlm.VISION), dict(vlm.TEXT)
    if args.dry_run:  # tiny widths, the same image and prompt layout
        vision.update(hidden_size=32, intermediate_size=64, num_attention_heads=2)
        text.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(num_hidden_layers=vision_layers, **vision),
        text_config=transformers.LlamaConfig(num_hidden_layers=lm_layers, **text),
        image_token_id=vlm.IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise 7B parameters on the GPU, in bf16: seconds, not minutes
    try:
        with torch.device(device):
            model = transformers.LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    ids = torch.tensor([vlm.BEFORE + [vlm.IMAGE_TOKEN] * 576 + vlm.AFTER], device=device)
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    def prefill() -> object:
        return model.generate(**inputs, max_new_tokens=1, do_sample=False)

    settings = {"unpatched": (_switch(model), prefill), "64": (_switch(model, visual_tokens=64), prefill)}
    with torch.inference_mode():
        medians = interleaved(settings, args.reps, timer, log)
    tome.unpatch(model)
    base, t = medians["unpatched"], medians["64"]
    prompt = len(vlm.BEFORE) + len(vlm.AFTER)
    ideal = vlm.flops(vision_layers, lm_layers, prompt + 576) / vlm.flops(
        vision_layers, lm_layers, prompt + 64
    )
    return [
        f"| LLaVA-1.5-7B layout prefill ({vision_layers}+{lm_layers} layers) | 336 | 1 | {str(dtype)[6:]} | eager | "
        f"visual_tokens=64 | 576→64 | {1e3 * base:.1f} | {1e3 * t:.1f} | {base / t:.2f}x | {ideal:.2f}x | "
        f"{base / t / ideal:.3f} |"
    ]


# -- diffusion UNet -----------------------------------------------------------------------------


def unet_case(device, args, timer, log) -> list[str]:
    """SD 1.5 UNet at 512 px (64 x 64 latents), ratio 0.5, fp16."""
    import diffusers

    dtype = torch.float32 if args.dry_run else torch.float16
    latent, batch = (16, 1) if args.dry_run else (64, 2)
    log(f"  SD 1.5 UNet, {latent * 8} px, {str(dtype)[6:]}")
    torch.manual_seed(0)
    if args.dry_run:
        net = diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=768, attention_head_dim=8,
            sample_size=latent, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )  # fmt: skip
    else:
        net = diffusers.UNet2DConditionModel(cross_attention_dim=768)
    net = net.eval().to(device, dtype)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
    text = torch.randn(batch, 77, 768, generator=g).to(device, dtype)
    timestep = torch.tensor(500, device=device)

    def call() -> object:
        return net(sample, timestep, encoder_hidden_states=text).sample

    settings = {"unpatched": (_switch(net), call), "0.5": (_switch(net, ratio=0.5), call)}
    with torch.inference_mode():
        medians = interleaved(settings, args.reps, timer, log)
    tome.unpatch(net)
    base, t = medians["unpatched"], medians["0.5"]
    return [
        f"| SD 1.5 UNet | {latent * 8} | {batch} | {str(dtype)[6:]} | eager | ratio=0.5 | – | {1e3 * base:.1f} | "
        f"{1e3 * t:.1f} | {base / t:.2f}x | – | – |"
    ]


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU: check the wiring, no figures"
    )
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 10; dry run 1)")
    parser.add_argument(
        "--cases", default="vit,flex,vlm,unet", help="comma-separated subset of vit, flex, vlm, unet"
    )
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - {"vit", "flex", "vlm", "unet"})
    if unknown:
        parser.error(f"--cases: expected some of vit, flex, vlm, unet, got {', '.join(unknown)}")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/gpu_suite.py needs a CUDA device: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). "
            "On a machine without one, `--dry-run` checks the script on tiny CPU shapes."
        )
    args.reps = args.reps or (1 if args.dry_run else 10)
    device = torch.device("cpu" if args.dry_run else "cuda")
    name = "CPU (dry run: tiny shapes, no figures)" if args.dry_run else torch.cuda.get_device_name(device)
    timer = Timer(device)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    rows: list[str] = []
    if "vit" in cases:
        # (family, px, batch, schedules)
        vits = [("timm", 224, 64, [16, (16, -0.75)]), ("transformers", 224, 64, [16, (16, -0.75)]),
                ("timm", 518, 16, [64, (64, -0.75)])]  # fmt: skip
        for family, size, batch, schedules in vits:
            if args.dry_run:
                size, batch, schedules = 56, 2, [2, (2, -0.75)]  # 17 tokens
            for dtype in (torch.float16, torch.bfloat16):
                rows += vit_case(family, size, batch, schedules, dtype, False, device, args, timer, log)
            # compiled at 224 px only: each patched block compiles on its own (its own token
            # count), and the 518 px compilations would not fit the few minutes
            if not args.no_compile and (size == 224 or args.dry_run):
                rows += vit_case(
                    family, size, batch, schedules, torch.bfloat16, True, device, args, timer, log
                )
            if args.dry_run:
                break  # one family suffices to check the wiring
    flex_rows: list[str] = []
    if "flex" in cases:
        flex_cases = [(56, 2, 2)] if args.dry_run else [(224, 64, 16), (518, 16, 64)]
        dtypes = (torch.float32,) if args.dry_run else (torch.float16, torch.bfloat16)
        for size, batch, r in flex_cases:
            for dtype in dtypes:
                log(
                    f"  attention kernels {size}px {str(dtype)[6:]} ({time.perf_counter() - START:.0f}s elapsed)"
                )
                flex_rows.append(
                    attention_kernel.case(size, batch, r, dtype, device, args.reps, args.dry_run)
                )
    if "vlm" in cases:
        rows += vlm_case(device, args, timer, log)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the 7B model is gone with its case: room for the UNet
    if "unet" in cases:
        rows += unet_case(device, args, timer, log)
    print(f"\n{name}, torch {torch.__version__}; random weights; medians of {args.reps} interleaved rounds\n")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    print("\n".join(rows))
    if flex_rows:
        print("\nProportional attention's kernels (timm ViT-S/14, eager):\n")
        print(attention_kernel.HEADER)
        print("|" + "---|" * (attention_kernel.HEADER.count("|") - 1))
        print("\n".join(flex_rows))
    print(f"\n{time.perf_counter() - start:.0f}s in all")


if __name__ == "__main__":
    main()
