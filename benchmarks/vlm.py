"""Time to first token and KV cache of a vision-language model, unpatched and with each image
reduced to a few visual tokens (``tome.patch(llava, visual_tokens=k)``).

One command, one process; prints one markdown table (docs/vlm.md)::

    python benchmarks/vlm.py                         # LLaVA-1.5-7B layout, 2 + 2 layers, 576 -> 144 / 64
    python benchmarks/vlm.py --tokens 288 144 64 --reps 5
    python benchmarks/vlm.py --lm-layers 1 --vision-layers 1 --reps 1   # a smoke run

The model is transformers' own ``LlavaForConditionalGeneration`` with LLaVA-1.5-7B's layout and
random weights (speed does not depend on them): a CLIP ViT-L/14 vision tower at 336 px (577
tokens, the second-to-last layer's 576 patch tokens read), the 2-layer GELU projector, a
Llama/Vicuna-7B language model (4096 wide, 11008 MLP, 32 heads, 32,064 words). Both are cut to
a few layers (``--vision-layers``, ``--lm-layers``) so that a CPU finishes; the FLOP-ideal
columns give the full depth's figure too (24 + 32 layers). fp32, batch 1, SDPA; the prompt is
LLaVA-1.5's template around one image (576 placeholders + 19 text tokens).

Every repetition runs each setting once, in turn (unpatched first), so slow drifts of a shared
machine hit all alike; the table shows medians. By default torch runs one thread and the clock is
that thread's CPU time (``time.thread_time``), as in ``benchmarks/diffusion.py``: on a shared
2-core machine two OpenMP threads wait for each other at every op (measured here: the merge
576 -> 64 took 24-31 ms on one thread, 90-560 ms on two), and wall-clock medians swing by 2x.
``--threads 2 --clock wall`` times what a user of an idle machine sees. Columns:

- LM tokens: the prompt's length as the language model reads it;
- TTFT: median seconds of ``generate(**inputs, max_new_tokens=1)``: vision tower, merge and
  the language model's prefill (the unchanged call, as a user times it);
- speedup: unpatched TTFT / TTFT;
- FLOP-ideal: the speedup if time followed FLOPs (matrix products and attention, vision tower
  included), for the cut model and for the full 7B depth;
- of a native k-token model: the TTFT of the same model unpatched, had its vision side given k
  tokens (its vision tower, then the prefill of the shorter prompt with the first k features
  given), over the patched TTFT: 1.00 means tome adds nothing beyond reading fewer tokens. On a
  CPU the language model's matrix products run slower per FLOP on a short prompt (fewer rows
  for the same weights to stream), so the FLOP-ideal speedup is out of reach even for that
  native model; this column separates tome's own cost from the hardware's;
- vision tower: its share of the TTFT (``get_image_features``, timed apart, unpatched);
- decode tok/s: one over the median time of a decode step (``generate`` of ``1 + --decode``
  tokens, the clock read at every step), proportional attention's bias included;
- merge: median seconds of the merge alone (:func:`tome.adapters.common.vlm.reduce_images` on
  the projected features), timed apart, and its share of the TTFT;
- KV cache: bytes of the cache after the prefill (measured, fp32, the cut model), and for the
  full 7B in fp16 (32 layers x 2 x 4096 x 2 bytes per token).
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
from tome.adapters.common.vlm import reduce_images  # noqa: E402

IMAGE_TOKEN = 32000
# CLIP ViT-L/14-336 and Vicuna-7B (LLaVA-1.5-7B)
VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "image_size": 336,
          "patch_size": 14, "hidden_act": "quick_gelu"}  # fmt: skip
TEXT = {"vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
        "num_key_value_heads": 32, "max_position_embeddings": 4096, "pad_token_id": 0}  # fmt: skip
FULL_DEPTH = (24, 32)  # vision layers, LM layers
# "USER: <image>\nWhat is shown in this image? ASSISTANT:" as LLaVA-1.5's tokenizer splits it
BEFORE = [1, 3148, 1001, 29901, 29871]
AFTER = [29871, 13, 5618, 338, 4318, 297, 445, 1967, 29973, 319, 1799, 9047, 13566, 29901]


def build(vision_layers: int, lm_layers: int) -> torch.nn.Module:
    import transformers

    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(num_hidden_layers=vision_layers, **VISION),
        text_config=transformers.LlamaConfig(num_hidden_layers=lm_layers, **TEXT),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).eval()


def flops(vision_layers: int, lm_layers: int, lm_tokens: int) -> float:
    """Matrix-product and attention FLOPs of one prefill (multiply-adds x 2)."""
    n, d, m = 577, VISION["hidden_size"], VISION["intermediate_size"]
    vision = vision_layers * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d)
    D, M = TEXT["hidden_size"], TEXT["intermediate_size"]
    projector = 2 * 576 * (d * D + D * D)
    lm = lm_layers * (2 * lm_tokens * (4 * D * D + 3 * D * M) + 4 * lm_tokens * lm_tokens * D)
    head = 2 * D * TEXT["vocab_size"]  # the last token's logits only
    return vision + projector + lm + head


class StepClock:
    """A logits processor that notes the clock at every generation step: the intervals between
    consecutive steps are the decode steps' times (the prefill's is not among them)."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.marks: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.marks.append(self.clock())
        return scores

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[144, 64], help="visual_tokens settings")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="cpu: the thread's CPU time")
    parser.add_argument("--decode", type=int, default=8, help="new tokens timed for decode tok/s (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock, "
        f"load {os.getloadavg()[0]:.1f}"
    )

    model = build(args.vision_layers, args.lm_layers)
    ids = torch.tensor([BEFORE + [IMAGE_TOKEN] * 576 + AFTER])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1)),
    }
    settings: list[int | None] = [None, *args.tokens]
    names = ("ttft", "merge", "native", "decode", "vision")
    times = {name: {s: [] for s in settings} for name in names}
    lengths: dict[int | None, int] = {}
    kv: dict[int | None, int] = {}
    greedy = {"do_sample": False, "return_dict_in_generate": True}
    with torch.no_grad():
        features = list(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        for rep in range(args.reps + 1):  # the first round warms up, untimed
            for setting in settings:
                measured = {}
                tome.unpatch(model)
                # what a model whose vision side gave k tokens would take: its vision tower (the
                # same), then the prefill of the shorter prompt, its features given; unpatched
                start = clock()
                image = model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
                measured["vision"] = clock() - start
                k = 576 if setting is None else setting
                image.pooler_output = [f[:k] for f in image.pooler_output]
                short = torch.tensor([BEFORE + [IMAGE_TOKEN] * k + AFTER])
                start = clock()
                model.generate(
                    input_ids=short, attention_mask=torch.ones_like(short),
                    mm_encoder_outputs={"image": image}, max_new_tokens=1, **greedy,
                )  # fmt: skip
                measured["native"] = measured["vision"] + clock() - start
                if setting is not None:
                    tome.patch(model, visual_tokens=setting)
                start = clock()
                out = model.generate(**inputs, max_new_tokens=1, **greedy)
                measured["ttft"] = clock() - start
                if args.decode:
                    steps = StepClock(clock)
                    model.generate(
                        **inputs, max_new_tokens=1 + args.decode, min_new_tokens=1 + args.decode,
                        logits_processor=[steps], **greedy,
                    )  # fmt: skip
                    measured["decode"] = statistics.median(steps.intervals())
                start = clock()
                reduce_images(features, setting, None if setting else 0.0)
                measured["merge"] = clock() - start
                if rep:
                    for name, value in measured.items():
                        times[name][setting].append(value)
                lengths[setting] = out.cache.get_seq_length()
                kv[setting] = cache_bytes(out.cache)
    tome.unpatch(model)

    def median(name: str, setting) -> float:
        return statistics.median(times[name][setting])

    base = median("ttft", None)
    print(
        f"\nLLaVA-1.5-7B layout cut to {args.vision_layers} vision + {args.lm_layers} LM layers, random "
        f"weights, fp32, batch 1; median of {args.reps} interleaved runs; {args.clock} clock, "
        f"{args.threads} thread(s)\n"
    )
    print("| visual tokens | LM tokens | TTFT s | speedup | FLOP-ideal (cut / full 7B) | of a native k-token model | vision tower | merge s | decode tok/s | KV cache (cut, fp32) | KV cache (full 7B, fp16) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for setting in settings:
        t = median("ttft", setting)
        cut = flops(args.vision_layers, args.lm_layers, lengths[None]) / flops(
            args.vision_layers, args.lm_layers, lengths[setting]
        )
        full = flops(*FULL_DEPTH, lengths[None]) / flops(*FULL_DEPTH, lengths[setting])
        full_kv = lengths[setting] * FULL_DEPTH[1] * 2 * TEXT["hidden_size"] * 2
        merge = median("merge", setting)
        merge = "-" if setting is None else f"{merge:.3f} ({100 * merge / t:.1f}%)"
        decode = f"{1 / median('decode', setting):.2f}" if args.decode else "-"
        print(
            f"| {576 if setting is None else setting} {'(unpatched)' if setting is None else ''} "
            f"| {lengths[setting]} | {t:.3f} | {base / t:.2f}x | {cut:.2f}x / {full:.2f}x "
            f"| {median('native', setting) / t:.2f} | {100 * median('vision', setting) / t:.0f}% | {merge} "
            f"| {decode} | {kv[setting] / 2**20:.1f} MiB | {full_kv / 2**20:.0f} MiB |"
        )
    print(f"\nload at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
