"""Time to first token and KV cache of a video language model, unpatched and with each video's
tokens merged across frames, then inside each scene (``tome.patch(qwen, video_ratio=...)``).

One command, one process; prints one markdown table per clip length (docs/video.md)::

    python benchmarks/video.py                                   # 16 / 32 / 64 frames, 0.5-0.95
    python benchmarks/video.py --frames 32 --ratios 0.5 0.9 --reps 1   # a smoke run
    python benchmarks/video.py --size 448 --lm-layers 2          # Qwen's 448 px (slow on a CPU)

The model is transformers' own ``Qwen2_5_VLForConditionalGeneration`` with Qwen2.5-VL-7B's
layout and random weights (speed does not depend on them): the ViT (1280 wide, 3420 MLP, 16
heads, patch 14, window attention, the 2x2 patch merger into 3584) and the 3584-wide language
model (18944 MLP, 28 heads, 4 KV heads, 152,064 words), cut to ``--vision-layers`` and
``--lm-layers`` so that a CPU finishes; the FLOP-ideal columns give the full depth's figure too
(32 + 28 layers). fp32, batch 1, SDPA. The clip: ``--frames`` frames of ``--size`` px (Qwen reads
them in temporal groups of 2: ``frames / 2 x (size / 28)^2`` video tokens), a slow pan over one
random picture for the first half, then a cut to another (speed does not depend on the content,
beyond the merge's own loop); a 20-token text prompt around it.

Every repetition runs each setting once, in turn (unpatched first), so slow drifts of a shared
machine hit all alike; the tables show medians. By default torch runs one thread and the clock
is that thread's CPU time (``time.thread_time``), as in ``benchmarks/vlm.py`` (two OpenMP threads
on a shared 2-core machine wait for each other at every op). Columns:

- LM tokens: the prompt as the language model reads it;
- TTFT: median seconds of ``generate(**inputs, max_new_tokens=1)``: vision tower, merge, prefill;
- speedup: unpatched TTFT / TTFT; "of ideal": speedup / FLOP-ideal speedup of the cut model;
- FLOP-ideal: the speedup if time followed FLOPs (matrix products and attention, vision tower
  included), for the cut model and for the full 7B depth;
- of a native k-token model: the TTFT of the same model unpatched had its vision side given
  the k video tokens tome keeps (its vision tower on the same clip, then the prefill of the
  shorter prompt with the first k features given, their positions a grid of one temporal group,
  one row of k), over the patched TTFT: 1.00 means tome adds nothing beyond reading fewer
  tokens. What differs from a real clip of k tokens: the vision tower still reads every pixel
  (as tome's does; a smaller clip would also shorten the tower) and the positions of the k
  tokens (which cost nothing). "native of ideal": that native model's own speedup over the
  unpatched TTFT, over the FLOP-ideal: what the CPU allows on a prefill that short, tome or not;
- after the tower: the TTFT less the vision tower's median, for tome (its merge, positions and
  the prefill of the merged prompt) and for the native model (the prefill alone): the language
  model's side compared like with like;
- vision tower: its share of the TTFT (``get_video_features`` on the clip, timed apart);
- merge: median seconds of the video merge alone (:func:`merge_video` on the features the
  language model reads), timed apart, and its share of the TTFT;
- KV cache: bytes after the prefill (measured, fp32, the cut model), and for the full 7B in fp16
  (28 layers x keys and values x 4 KV heads x 128 x 2 bytes per token).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tome  # noqa: E402
from tome.adapters.common.video import kept_video_tokens, merge_video  # noqa: E402

VIDEO, START, END, IMAGE = 151656, 151652, 151653, 151655
# Qwen2.5-VL-7B-Instruct's config
VISION = {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
          "tokens_per_second": 2}  # fmt: skip
TEXT = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
        "num_key_value_heads": 4, "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24],
        "rope_theta": 1e6}, "pad_token_id": 151643}  # fmt: skip
FULL_DEPTH = (32, 28)  # vision layers, LM layers
BEFORE = [151644, 872, 198, 151652]  # <|im_start|>user\n<|vision_start|>
AFTER = [151653, 3838, 374, 12482, 304, 419, 2766, 30, 151645, 198, 151644, 77091, 198, 1, 2, 3]


def build(vision_layers: int, lm_layers: int) -> torch.nn.Module:
    import transformers

    # full attention in the last vision layer, as every 8th of the 7B's
    vision = {**VISION, "depth": vision_layers, "fullatt_block_indexes": [vision_layers - 1]}
    config = transformers.Qwen2_5_VLConfig(
        vision_config=vision,
        text_config={**TEXT, "num_hidden_layers": lm_layers},
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def clip(frames: int, size: int, seed: int = 1) -> torch.Tensor:
    """``(frames, 3, size, size)``: a slow pan over one picture, then a cut to another."""
    g = torch.Generator().manual_seed(seed)
    scenes = [torch.randn(3, size, size + frames, generator=g) for _ in range(2)]
    out = []
    for f in range(frames):
        scene = scenes[0] if f < frames // 2 else scenes[1]
        out.append(scene[:, :, f : f + size] + 0.05 * torch.randn(3, size, size, generator=g))
    return torch.stack(out)


def patches(video: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """Qwen2-VL's image processor's layout: ``(T * gh * gw, C * temporal * patch * patch)``,
    patches ordered by temporal group, 2x2 merge window, then place in it."""
    F, C, H, W = video.shape
    T, gh, gw = F // temporal, H // patch, W // patch
    x = video.reshape(T, temporal, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(T * gh * gw, C * temporal * patch * patch)


def flops(vision_layers: int, lm_layers: int, patches_: int, group: int, lm_tokens: int) -> float:
    """Matrix-product and attention FLOPs of one prefill (multiply-adds x 2); vision attention
    counted within one temporal group (``group`` patches)."""
    d, m = VISION["hidden_size"], VISION["intermediate_size"]
    vision = vision_layers * (2 * patches_ * (4 * d * d + 3 * d * m) + 4 * patches_ * group * d)
    D, M, H = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["num_attention_heads"]
    kv = D // H * TEXT["num_key_value_heads"]
    merger = 2 * (patches_ // 4) * (4 * d * 4 * d + 4 * d * D)
    lm = lm_layers * (2 * lm_tokens * (2 * D * D + 2 * D * kv + 3 * D * M) + 4 * lm_tokens * lm_tokens * D)
    head = 2 * D * TEXT["vocab_size"]  # the last token's logits only
    return vision + merger + lm + head


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def native_ttft(model, inputs: dict, k: int, clock) -> tuple[float, float]:
    """Seconds of the vision tower on the clip, and of the unpatched model reading a prompt
    of ``k`` video tokens: that tower, then the prefill of the shorter prompt with the first
    ``k`` features given (``mm_encoder_outputs``), placed as one temporal group of one row."""
    start = clock()
    video = model.get_video_features(
        pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"]
    )
    vision = clock() - start
    video.pooler_output = [torch.cat(list(video.pooler_output))[:k]]
    short = torch.tensor([BEFORE + [VIDEO] * k + AFTER])
    model.generate(
        input_ids=short, attention_mask=torch.ones_like(short), mm_token_type_ids=2 * (short == VIDEO).int(),
        video_grid_thw=torch.tensor([[1, 2, 2 * k]]), second_per_grid_ts=torch.tensor([1.0]),
        mm_encoder_outputs={"video": video}, max_new_tokens=1, do_sample=False,
    )  # fmt: skip
    return vision, clock() - start


def run_clip(model, frames: int, size: int, ratios: list[float], reps: int, clock, args) -> None:
    pixels = patches(clip(frames, size))
    T, g = frames // 2, size // 14
    grid = torch.tensor([[T, g, g]])
    n = T * g * g // 4
    ids = torch.tensor([BEFORE + [VIDEO] * n + AFTER])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": 2 * (ids == VIDEO).int(),
        "pixel_values_videos": pixels,
        "video_grid_thw": grid,
        "second_per_grid_ts": torch.tensor([1.0]),
    }
    settings: list[float | None] = [None, *ratios]
    times: dict = {s: [] for s in settings}
    merges: dict = {s: [] for s in settings}
    natives: dict = {s: [] for s in settings}
    visions: dict = {s: [] for s in settings}
    lengths, kv = {}, {}
    with torch.no_grad():
        features = model.get_video_features(pixel_values_videos=pixels, video_grid_thw=grid).pooler_output[0]
        for rep in range(reps + 1):  # the first round warms up, untimed
            for setting in settings:
                tome.unpatch(model)
                vision, native = native_ttft(model, inputs, kept_video_tokens(n, setting), clock)
                if setting is not None:
                    tome.patch(model, video_ratio=setting)
                start = clock()
                out = model.generate(
                    **inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True
                )
                elapsed = clock() - start
                start = clock()
                merge_video(features, T, kept_video_tokens(n, setting))
                merge = clock() - start
                if rep:
                    times[setting].append(elapsed)
                    merges[setting].append(merge)
                    natives[setting].append(native)
                    visions[setting].append(vision)
                lengths[setting] = out.cache.get_seq_length()
                kv[setting] = cache_bytes(out.cache)
    tome.unpatch(model)
    base = statistics.median(times[None])
    P = T * g * g
    print(
        f"\n{frames} frames at {size} px: {T} temporal groups x {g * g // 4} = {n} video tokens; "
        f"Qwen2.5-VL-7B layout cut to {args.vision_layers} vision + {args.lm_layers} LM layers, random "
        f"weights, fp32, batch 1; median of {reps} interleaved runs\n"
    )
    print("| video_ratio | LM tokens | TTFT s | speedup | FLOP-ideal (cut / full 7B) | of ideal (cut) | native k-token TTFT s | of a native k-token model | native of ideal (cut) | after the tower s (tome / native) | vision tower | merge s (share) | KV cache (cut, fp32) | KV cache (full 7B, fp16) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for setting in settings:
        t = statistics.median(times[setting])
        cut = flops(args.vision_layers, args.lm_layers, P, g * g, lengths[None]) / flops(
            args.vision_layers, args.lm_layers, P, g * g, lengths[setting]
        )
        full = flops(*FULL_DEPTH, P, g * g, lengths[None]) / flops(*FULL_DEPTH, P, g * g, lengths[setting])
        kv_full = lengths[setting] * FULL_DEPTH[1] * 2 * 512 * 2
        merge = statistics.median(merges[setting])
        merge_cell = "-" if setting is None else f"{merge:.3f} ({100 * merge / t:.1f}%)"
        native = statistics.median(natives[setting])
        vision = statistics.median(visions[setting])
        print(
            f"| {'unpatched' if setting is None else setting} | {lengths[setting]} | {t:.2f} | "
            f"{base / t:.2f}x | {cut:.2f}x / {full:.2f}x | {base / t / cut:.2f} | {native:.2f} | "
            f"{native / t:.2f} | {base / native / cut:.2f} | {t - vision:.2f} / {native - vision:.2f} | "
            f"{100 * vision / t:.0f}% | {merge_cell} | "
            f"{kv[setting] / 2**20:.1f} MiB | {kv_full / 2**20:.0f} MiB |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95])
    parser.add_argument("--size", type=int, default=224, help="pixels per side (a multiple of 28)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--lm-layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="cpu: the thread's CPU time")
    args = parser.parse_args()
    if args.size % 28 or any(f % 2 for f in args.frames):
        parser.error("--size: a multiple of 28; --frames: even numbers (Qwen groups frames in pairs)")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    model = build(args.vision_layers, args.lm_layers)
    for frames in args.frames:
        run_clip(model, frames, args.size, args.ratios, args.reps, clock, args)
    print(f"\nload at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
