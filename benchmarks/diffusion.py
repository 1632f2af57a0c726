"""Speed and output change of token merging in diffusion denoisers: unpatched, tome and tomesd
side by side (SD 1.5 / SDXL UNets, PixArt-alpha, SD3-medium, Flux layouts, random weights).

One command, one process; prints one markdown table per model and size::

    python benchmarks/diffusion.py --suite                 # docs/diffusion.md's table (29 min measured)
    python benchmarks/diffusion.py --model sd15            # SD 1.5 UNet, 512 px, batch 2
    python benchmarks/diffusion.py --model pixart --latent 128 --layers 2
    python benchmarks/diffusion.py --model sd15 --latent 32 --reps 1   # a smoke run

Models are diffusers' own classes with the real models' layouts and random weights (speed does
not depend on them): ``sd15`` (``UNet2DConditionModel`` default config, 77 text tokens of 768),
``sdxl`` (SDXL's UNet layout, 77 tokens of 2048, text-time conditioning), ``pixart``
(PixArt-alpha: ``PixArtTransformer2DModel``, 28 layers, 120 T5 tokens), ``sd3`` (SD3-medium:
``SD3Transformer2DModel``, 24 layers of 1536, 333 text tokens), ``flux`` (Flux-dev:
``FluxTransformer2DModel``, 19 double- and 38 single-stream blocks of 3072, 512 text tokens,
guidance embedding). ``--layers`` keeps only the first layers (DiTs; for SDXL the transformer
depth of its lowest level), so that a CPU forward takes seconds, not minutes: token merging
acts per block, so its speedup on a few blocks is that of the whole stack of equal blocks, up to
the share of the embedding and output layers (which grows as blocks are removed: the figures
are then slightly conservative). Inputs: random latents, a mid timestep, random text states,
fp32 on CPU, no gradients.

Every repetition times each setting once, in turn (unpatched, then every tome and tomesd
setting), so slow drifts of the machine hit all alike; the table shows medians. Defaults:
tomesd's options (``max_downsample=1``, 2 for SDXL as its finest attention level is 2x
downsampled; ``sx=sy=2, use_rand=True``; self-attention merged only) for both libraries at the
same ratio; extra rows: tome's options (``match_every``, ``merge_queries=False``,
``merge_mlp``).

``--clock cpu`` (the suite's) times the CPU seconds of the calling thread (``time.thread_time``)
with one torch thread: on a machine shared with other jobs, wall-clock medians swing by 2x; CPU
time of a single thread does much less (it still feels the caches and memory bandwidth other
jobs share). The machine's load average is printed at the start and the end.

Columns:

- s/forward: median seconds of one denoiser forward; speedup: unpatched / setting;
- match %: share of the forward spent in tome's matching (``random2d_matching``), timed with the
  same clock by a wrapper around it during the timed forwards;
- rel. L2: ``||y - y0|| / ||y0||`` of the denoiser output against the unpatched output ``y0``
  (random weights: a measure of how much the output moves, not of image quality).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tome  # noqa: E402
from tome.adapters.common import diffusion as tome_diffusion  # noqa: E402

CLOCK = time.perf_counter
NAMES = {
    "sd15": "SD 1.5 UNet",
    "sdxl": "SDXL UNet",
    "pixart": "PixArt-alpha",
    "sd3": "SD3-medium",
    "flux": "Flux-dev",
}


def build(model: str, latent: int, batch: int, layers: int | None, seed: int = 0):
    """``(denoiser, inputs as keywords, tomesd's max_downsample for it, depth note)``."""
    import diffusers

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1)
    note = ""
    if model == "sd15":
        net = diffusers.UNet2DConditionModel(cross_attention_dim=768)
        inputs = {
            "sample": torch.randn(batch, 4, latent, latent, generator=g),
            "timestep": torch.tensor(500),
            "encoder_hidden_states": torch.randn(batch, 77, 768, generator=g),
        }
        return net.eval(), inputs, 1, note
    if model == "sdxl":
        depth = (1, 2, 10) if layers is None else (1, 2, layers)
        if layers is not None:
            note = f"transformer depth {depth} (SDXL: (1, 2, 10))"
        net = diffusers.UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=depth, attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )  # fmt: skip
        inputs = {
            "sample": torch.randn(batch, 4, latent, latent, generator=g),
            "timestep": torch.tensor(500),
            "encoder_hidden_states": torch.randn(batch, 77, 2048, generator=g),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(batch, 1280, generator=g),
                "time_ids": torch.tensor(
                    [[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * batch
                ).float(),
            },
        }
        return net.eval(), inputs, 2, note
    if model == "pixart":
        n = 28 if layers is None else layers
        note = "" if layers is None else f"{n} of 28 layers"
        net = diffusers.PixArtTransformer2DModel(
            num_layers=n, sample_size=latent, caption_channels=4096, use_additional_conditions=False
        )
        inputs = {
            "hidden_states": torch.randn(batch, 4, latent, latent, generator=g),
            "encoder_hidden_states": torch.randn(batch, 120, 4096, generator=g),
            "timestep": torch.full((batch,), 500),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
        return net.eval(), inputs, 1, note
    if model == "sd3":
        n = 24 if layers is None else layers
        note = "" if layers is None else f"{n} of 24 layers"
        net = diffusers.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=n, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
        )  # fmt: skip
        inputs = {
            "hidden_states": torch.randn(batch, 16, latent, latent, generator=g),
            "encoder_hidden_states": torch.randn(batch, 333, 4096, generator=g),
            "pooled_projections": torch.randn(batch, 2048, generator=g),
            "timestep": torch.full((batch,), 500),
        }
        return net.eval(), inputs, 1, note
    if model == "flux":
        double, single = (19, 38) if layers is None else (layers, layers)
        note = "" if layers is None else f"{double} of 19 double + {single} of 38 single blocks"
        net = diffusers.FluxTransformer2DModel(
            num_layers=double, num_single_layers=single, guidance_embeds=True, axes_dims_rope=(16, 56, 56)
        )
        h = w = latent // 2  # Flux packs 2 x 2 latent patches into one token
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        inputs = {
            "hidden_states": torch.randn(batch, h * w, 64, generator=g),
            "encoder_hidden_states": torch.randn(batch, 512, 4096, generator=g),
            "pooled_projections": torch.randn(batch, 768, generator=g),
            "timestep": torch.full((batch,), 0.5),
            "img_ids": ids.reshape(-1, 3),
            "txt_ids": torch.zeros(512, 3),
            "guidance": torch.full((batch,), 3.5),
        }
        return net.eval(), inputs, 1, note
    raise ValueError(f"model: expected one of {', '.join(NAMES)}, got {model!r}")


def set_state(net: torch.nn.Module, kind: str, ratio: float, options: dict) -> None:
    tome.unpatch(net)
    if importlib.util.find_spec("tomesd") is not None:
        import tomesd

        tomesd.remove_patch(net)
    if kind == "tome":
        tome.patch(net, ratio=ratio, **options)
    elif kind == "tomesd":
        import tomesd

        tomesd.apply_patch(net, ratio=ratio, **options)


def forward(net: torch.nn.Module, inputs: dict) -> tuple[float, torch.Tensor]:
    first, *rest = inputs  # the latents positionally: tomesd's hook reads them from args[0]
    start = CLOCK()
    with torch.no_grad():
        out = net(inputs[first], **{k: inputs[k] for k in rest}).sample
    return CLOCK() - start, out


@contextlib.contextmanager
def timed_matching(total: list[float]) -> Iterator[None]:
    original = tome_diffusion.random2d_matching

    def wrapper(*args, **kwargs):
        start = CLOCK()
        try:
            return original(*args, **kwargs)
        finally:
            total[0] += CLOCK() - start

    tome_diffusion.random2d_matching = wrapper
    try:
        yield
    finally:
        tome_diffusion.random2d_matching = original


def _label(options: dict) -> str:
    shown = {k: v for k, v in options.items() if k != "max_downsample"}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def run_one(model: str, latent: int, batch: int, ratios: list[float], reps: int, layers: int | None,
            variants: list[dict], with_tomesd: bool = True) -> None:  # fmt: skip
    """Time one model at one size and print its table."""
    net, inputs, max_downsample, note = build(model, latent, batch, layers)
    base = {"max_downsample": max_downsample} if model in ("sd15", "sdxl") else {}
    settings: list[tuple[str, float, dict]] = [("unpatched", 0.0, {})]
    settings += [("tome", r, base) for r in ratios]
    settings += [("tome", r, {**base, **v}) for r in ratios if r == 0.5 for v in variants]
    tomesd_error = ""
    if with_tomesd:
        try:  # tomesd supports UNet2DConditionModel only; say how it fails elsewhere
            set_state(net, "tomesd", ratios[0], dict(base))
            if model not in ("sd15", "sdxl"):
                forward(net, inputs)
            settings += [("tomesd", r, base) for r in ratios]
        except Exception as error:  # reported in the table
            tomesd_error = f"{type(error).__name__}: {error}"[:100]
        set_state(net, "unpatched", 0.0, {})
    times: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    shares: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    outputs: dict[int, torch.Tensor] = {}
    forward(net, inputs)  # warm-up
    for _ in range(reps):
        for i, (kind, ratio, options) in enumerate(settings):
            set_state(net, kind, ratio, options)
            total = [0.0]
            with timed_matching(total):
                elapsed, outputs[i] = forward(net, inputs)
            times[i].append(elapsed)
            shares[i].append(total[0] / elapsed)
    set_state(net, "unpatched", 0.0, {})

    base_time = statistics.median(times[0])
    reference = outputs[0]
    tokens = inputs["sample"] if "sample" in inputs else inputs["hidden_states"]
    px = latent * 8
    print(
        f"\n{NAMES[model]} (random weights{', ' + note if note else ''}), {px} px (latents {latent}), "
        f"batch {batch}, fp32 CPU, {torch.get_num_threads()} thread(s), {CLOCK.__name__} clock, "
        f"median of {reps}; input {tuple(tokens.shape)}\n"
    )
    print("| setting | ratio | s/forward | speedup | match % | rel. L2 vs unpatched |")
    print("|---|---|---|---|---|---|")
    for i, (kind, ratio, options) in enumerate(settings):
        median = statistics.median(times[i])
        change = ((outputs[i] - reference).norm() / reference.norm()).item()
        extra = _label(options)
        name = f"{kind} ({extra})" if extra and kind == "tome" else kind
        share = f"{100 * statistics.median(shares[i]):.1f}" if kind == "tome" else ""
        label = "" if kind == "unpatched" else f"{ratio:g}"
        print(f"| {name} | {label} | {median:.3f} | {base_time / median:.2f}x | {share} | {change:.4f} |")
    if tomesd_error:
        print(f"\ntomesd 0.1.3 on this model: fails ({tomesd_error})")
    for ratio in ratios:
        ours = [i for i, s in enumerate(settings) if s[0] == "tome" and s[1] == ratio and s[2] == base]
        theirs = [i for i, s in enumerate(settings) if s[0] == "tomesd" and s[1] == ratio]
        if ours and theirs:
            t_ours, t_theirs = statistics.median(times[ours[0]]), statistics.median(times[theirs[0]])
            print(f"\nratio {ratio:g}: tome / tomesd throughput = {t_theirs / t_ours:.2f}x", end="")
    print(flush=True)
    del net


# (model, latent, batch, ratios, reps, layers, variants at ratio 0.5, with tomesd)
SUITE = [
    ("sd15", 64, 2, [0.3, 0.5, 0.7], 3, None, [{"match_every": 5}, {"merge_queries": False}], True),
    ("pixart", 64, 2, [0.3, 0.5, 0.7], 3, 4, [{"merge_mlp": True}, {"match_every": 2}], True),
    ("pixart", 128, 2, [0.3, 0.5, 0.7], 2, 2, [{"merge_mlp": True}], False),
    ("sd3", 64, 2, [0.3, 0.5, 0.7], 3, 2, [{"merge_mlp": True}], True),
    ("sd3", 128, 2, [0.5], 2, 2, [{"merge_mlp": True}], False),
    ("flux", 64, 2, [0.3, 0.5, 0.7], 2, 1, [{"merge_mlp": True}], True),
    ("flux", 128, 1, [0.5], 1, 1, [{"merge_mlp": True}], False),
    ("sd15", 128, 2, [0.5], 1, None, [{"match_every": 5}], True),
    ("sdxl", 128, 2, [0.5], 1, 2, [{"match_every": 10}], True),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(NAMES), default="sd15")
    parser.add_argument("--latent", type=int, default=64, help="latent size (image size / 8); default 64")
    parser.add_argument("--batch", type=int, default=2, help="batch (a CFG pair: 2)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of every setting")
    parser.add_argument("--layers", type=int, default=None, help="keep only this many layers (see above)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: this thread's CPU time, 1 torch thread"
    )
    parser.add_argument(
        "--suite", action="store_true", help="docs/diffusion.md's table (implies --clock cpu)"
    )
    args = parser.parse_args(argv)
    global CLOCK
    if args.clock == "cpu" or args.suite:
        CLOCK = time.thread_time
        torch.set_num_threads(1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    start = time.perf_counter()
    if args.suite:
        for row in SUITE:
            run_one(*row)
    else:
        variants = (
            [{"match_every": 5}, {"merge_queries": False}] if args.model == "sd15" else [{"merge_mlp": True}]
        )
        run_one(args.model, args.latent, args.batch, args.ratios, args.reps, args.layers, variants)
    print(f"\nload average at end: {os.getloadavg()}; {time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
