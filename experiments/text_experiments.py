"""Choosing merging options for text encoders on the *calibration* halves only (the paragraphs of
even WikiText-2 articles, the even STS-2015 pairs), on all-MiniLM-L6-v2: embedding cosine to the
unmerged model and FLOP-ideal speedup at 128 and 256 tokens, and the STS Spearman change (x100).
``benchmarks/text.py`` then reports the chosen options on the held-out halves (``--half
held-out`` here runs a group on them, once the choice is made).

Some rows need what ``tome.patch`` does not offer; for those this script swaps parts of the
patched model's handle for one row (nothing here is library API):

- per-layer ratios (``layers=[0, .1, .2, ...]``): the handle's ratio is set at the start of
  every layer (``begin_layer``), so a layer removes its own fraction of each row's tokens;
- ``metric``: the merge decided by the hidden states' cosine (``x``), or by keys and hidden
  states together (``hk+x``: per-head keys, ``keys+x``: head-averaged keys; cosine of the
  concatenation of the normalized parts, ``x_weight`` the hidden states' share) -- since these
  rows, the text adapters' ``hidden_weight`` option (``x``: 1, ``hk+x``: ``x_weight``);
- ``prop_scale``: proportional attention's log(size) scaled;
- ``floor``: a row is never merged below ``floor`` tokens (short texts stay whole) -- since
  these rows, the text adapters' ``min_tokens`` option;
- ``protect_sep``: the [SEP] token is kept out of the merge (through the ``keep_outliers``
  token bias, swapped for one that marks [SEP], plus the ``k - 1`` largest-norm tokens).

    python experiments/text_experiments.py                  # all groups (~25 min on 2 busy cores)
    python experiments/text_experiments.py --group options --limit 32 --sts-pairs 400
    python experiments/text_experiments.py --group final --half held-out --limit 48

What was found (``--limit 48 --sts-pairs 1000``: 48 paragraphs per length, 500 STS pairs,
unmerged Spearman 82.65 on calibration; cos = mean embedding cosine at 128 / 256 tokens):

- options, ratio 0.1 (FLOP-ideal 1.36x / 1.38x): defaults (keys, mlerp) 0.965 / 0.959, STS
  -2.7; mode=mean 0.963 / 0.952; metric=head_keys 0.986 / 0.986, STS -1.1 (kept); head_keys +
  mean 0.985 / 0.984; prop_attn=False 0.977 / 0.978; keep_outliers=1 or 4: cos unchanged, STS
  -2.0 / -2.7. Same order at ratio 0.15 (head_keys 0.967 / 0.966).
- schedules at equal FLOPs (head_keys; ~1.36x and ~1.45x at 256 tokens): one ratio for all
  layers 0.988 / 0.987 and 0.983 / 0.981; from layer 1 on 0.986 / 0.984 and 0.977 / 0.973;
  from layer 2 on 0.980 / 0.976 and 0.966 / 0.965; ramping down 0.986 / 0.986 and 0.980 / 0.981;
  ramping up 0.987 / 0.988 and 0.981 / 0.978: none beats the uniform ratio by more than noise,
  late starts lose clearly.
- metric at ratio 0.115 (1.42x / 1.45x): head_keys 0.983 / 0.981; hidden states alone 0.984 /
  0.984; head_keys + hidden states 0.985 / 0.987 (weights 0.25 or 0.75: within 0.001).
- proportional attention x0.5: 0.980 / 0.979, x1.5: 0.969 / 0.971 (x1: 0.985 / 0.987).
- floor of 24 tokens: paragraphs unchanged, STS -1.15 -> -0.06 (the STS loss comes from
  merging short sentences: median 12 tokens).
- [SEP] kept whole: cos unchanged, STS -1.1 -> -2.1.
- caveat: the STS figures of every ``keep_outliers`` row (and of [SEP] kept whole, which goes
  through the same bias) are not trustworthy: in a padded batch ``keep_outliers`` makes a text's
  result depend on its batch (``encode(batch_size=1)`` vs 32 on STS sentences, ratio 0.2,
  ``keep_outliers=2``: min cosine 0.77, 4 of 64 texts differ; 1.0 without it); the paragraph
  rows have no padding and are not affected.

The text adapters' options (``--group tune --limit 48 --sts-pairs 1000``, calibration; cos at 128
/ 256 tokens; min_tokens=24 unless said):

- ratio 0.1 (FLOP-ideal 1.36x / 1.38x), hidden_weight 0 / 0.25 / 0.5 / 0.75: 0.9860 / 0.9855,
  0.9895 / 0.9908, 0.9888 / 0.9904, 0.9879 / 0.9887; STS -0.13, -0.14, -0.06, -0.08.
- ratio 0.115 (1.42x / 1.45x), hidden_weight 0 / 0.25 / 0.5 / 0.75 / 1: 0.9826 / 0.9808,
  0.9853 / 0.9863, 0.9850 / 0.9873, 0.9847 / 0.9857, 0.9844 / 0.9839 -> default 0.5.
- ratio 0.115, hidden_weight 0.5, min_tokens 0 / 16 / 24 / 32 / 48: paragraphs unchanged, STS
  -1.15, -0.22, -0.06, -0.04, -0.00 -> default 24 (a higher floor leaves more sentences unmerged,
  hence unsped, for ~0.05 points).
- the keep_outliers rows of "options" and "protect" are refused now (text encoders refuse
  keep_outliers); their figures above are from before.

Held-out (``--group final --half held-out --limit 48``; unmerged Spearman 83.18): ratio 0.115
head_keys 0.9836 / 0.9825, STS -1.60 (-0.04 with the floor); head_keys + hidden states with
the floor 0.9861 / 0.9907, STS +0.02; at ratio 0.1 (1.36x / 1.38x): head_keys 0.9863 / 0.9861,
STS -1.38; head_keys + hidden states with the floor 0.9912 / 0.9926, STS +0.02.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import text as T  # noqa: E402  (benchmarks/text.py)

from tome.core import merge as M  # noqa: E402

GROUPS: dict[str, list[tuple[str, dict, dict]]] = {
    # one option at a time around the library defaults, at ratio 0.1 (and 0.15)
    "options": [
        (f"ratio={q} {name}", {"ratio": q, **opts}, {})
        for q in (0.1, 0.15)
        for name, opts in (
            ("defaults (keys, mlerp)", {}),
            ("mode=mean", {"mode": "mean"}),
            ("metric=head_keys", {"metric": "head_keys"}),
            ("head_keys, mean", {"metric": "head_keys", "mode": "mean"}),
            ("head_keys, mean, prop_attn=False", {"metric": "head_keys", "mode": "mean", "prop_attn": False}),
            ("head_keys, prop_attn=False", {"metric": "head_keys", "prop_attn": False}),
            ("head_keys, mean, keep_outliers=1", {"metric": "head_keys", "mode": "mean", "keep_outliers": 1}),
            ("head_keys, mean, keep_outliers=4", {"metric": "head_keys", "mode": "mean", "keep_outliers": 4}),
        )
    ],
}


def _layers(name: str, ratios: list[float], opts: dict) -> tuple[str, dict, dict]:
    return (f"layers={ratios} {name}", {"ratio": max(ratios), **opts}, {"layers": ratios})


HKM = {"metric": "head_keys", "mode": "mean"}
GROUPS["schedules"] = [
    _layers("hk+mean", [0.1] * 6, HKM),
    _layers("hk+mean", [0.0, 0.12, 0.12, 0.12, 0.12, 0.12], HKM),
    _layers("hk+mean", [0.0, 0.0, 0.15, 0.15, 0.15, 0.15], HKM),
    _layers("hk+mean", [0.05, 0.08, 0.1, 0.12, 0.15, 0.2], HKM),
    _layers("hk+mean", [0.0, 0.05, 0.1, 0.15, 0.2, 0.25], HKM),
    _layers("hk+mean", [0.15, 0.12, 0.1, 0.08, 0.06, 0.04], HKM),
    _layers("hk+mean", [0.0, 0.1, 0.2, 0.2, 0.2, 0.2], HKM),
    _layers("hk+mean", [0.0, 0.0, 0.2, 0.2, 0.25, 0.25], HKM),
]
HK = {"metric": "head_keys"}
# Schedule shapes at equal FLOPs (FLOP-ideal ~1.36x and ~1.45x at 256 tokens), head_keys + mlerp.
GROUPS["pareto"] = [
    _layers("hk", ratios, HK)
    for ratios in (
        [0.095] * 6,
        [0, 0.141, 0.141, 0.141, 0.141, 0.141],
        [0, 0, 0.224, 0.224, 0.224, 0.224],
        [0.118, 0.103, 0.087, 0.071, 0.055, 0.04],
        [0.06, 0.084, 0.108, 0.132, 0.156, 0.18],
        [0.11, 0.11, 0.11, 0.055, 0.055, 0],
        [0.115] * 6,
        [0, 0.171, 0.171, 0.171, 0.171, 0.171],
        [0, 0, 0.277, 0.277, 0.277, 0.277],
        [0.143, 0.124, 0.105, 0.085, 0.066, 0.048],
        [0.074, 0.104, 0.134, 0.164, 0.194, 0.223],
        [0.131, 0.131, 0.131, 0.0655, 0.0655, 0],
    )
]
# What decides the merges: the hidden states themselves (cosine), or keys and hidden states.
GROUPS["metric"] = [
    (f"ratio={q} {name}", {"ratio": q, **opts}, extra)
    for q in (0.1, 0.115)
    for name, opts, extra in (
        ("head_keys", HK, {}),
        ("metric: hidden states", HK, {"metric": "x"}),
        ("metric: head_keys + hidden states", HK, {"metric": "hk+x"}),
        ("metric: keys + hidden states", {}, {"metric": "keys+x"}),
    )
]
# At ratio 0.115 (FLOP-ideal ~1.45x): the weight of the hidden states in the metric, the scale of
# proportional attention, and a floor under which a row is not merged (short texts kept whole).
GROUPS["tweaks"] = [
    (f"ratio=0.115 {name}", {"ratio": 0.115, **opts}, extra)
    for name, opts, extra in (
        ("hk + hidden states", HK, {"metric": "hk+x"}),
        ("hk + 0.25 hidden states", HK, {"metric": "hk+x", "x_weight": 0.25}),
        ("hk + 0.75 hidden states", HK, {"metric": "hk+x", "x_weight": 0.75}),
        ("hk + hidden states, mode=mean", {**HK, "mode": "mean"}, {"metric": "hk+x"}),
        ("hk + hidden states, prop_attn x0.5", HK, {"metric": "hk+x", "prop_scale": 0.5}),
        ("hk + hidden states, prop_attn x1.5", HK, {"metric": "hk+x", "prop_scale": 1.5}),
        ("hk + hidden states, floor 24 tokens", HK, {"metric": "hk+x", "floor": 24}),
        ("hk + hidden states, floor 40 tokens", HK, {"metric": "hk+x", "floor": 40}),
        ("hk, floor 24 tokens", HK, {"floor": 24}),
    )
]
# The candidates for core changes, for --half held-out (run after the choice was made).
GROUPS["final"] = [
    ("ratio=0.1 head_keys", {"ratio": 0.1, **HK}, {}),
    ("ratio=0.115 head_keys", {"ratio": 0.115, **HK}, {}),
    ("ratio=0.115 head_keys, floor 24", {"ratio": 0.115, **HK}, {"floor": 24}),
    ("ratio=0.1 head_keys + hidden states, floor 24", {"ratio": 0.1, **HK}, {"metric": "hk+x", "floor": 24}),
    (
        "ratio=0.115 head_keys + hidden states, floor 24",
        {"ratio": 0.115, **HK},
        {"metric": "hk+x", "floor": 24},
    ),
]
# The text adapters' options (min_tokens, hidden_weight), tuned on the calibration halves; the
# defaults of tome.patch for text encoders are the best rows here.
GROUPS["tune"] = [
    *[
        (
            f"ratio={q} hidden_weight={w}, min_tokens=24",
            {"ratio": q, **HK, "hidden_weight": w, "min_tokens": 24},
            {},
        )
        for q in (0.1, 0.115)
        for w in (0.0, 0.25, 0.5, 0.75, 1.0)
    ],
    *[
        (
            f"ratio=0.115 hidden_weight=0.5, min_tokens={m}",
            {"ratio": 0.115, **HK, "hidden_weight": 0.5, "min_tokens": m},
            {},
        )
        for m in (0, 16, 32, 48)
    ],
]
GROUPS["protect"] = [
    ("ratio=0.1 hk+mean", {"ratio": 0.1, **HKM}, {}),
    ("ratio=0.1 hk+mean protect [SEP]", {"ratio": 0.1, **HKM, "keep_outliers": 1}, {"protect_sep": True}),
    (
        "ratio=0.1 hk+mean protect [SEP] + 2 outliers",
        {"ratio": 0.1, **HKM, "keep_outliers": 3},
        {"protect_sep": True},
    ),
    ("ratio=0.1 defaults protect [SEP]", {"ratio": 0.1, "keep_outliers": 1}, {"protect_sep": True}),
]


# What tome.patch did for text when the earlier groups ran: the rows keep that meaning now that
# the text adapters default to head_keys, min_tokens=24 and hidden_weight=0.5.
BEFORE_TEXT_OPTIONS = {"metric": "keys", "min_tokens": 0, "hidden_weight": 0.0}


def as_options(options: dict, extra: dict) -> tuple[dict, dict]:
    """``tome.patch`` keywords of a row (the old ``floor`` / ``metric`` extras become the
    ``min_tokens`` / ``hidden_weight`` options) and the extras left for :func:`variant`."""
    options, extra = {**BEFORE_TEXT_OPTIONS, **options}, dict(extra)
    if "floor" in extra:
        options["min_tokens"] = extra.pop("floor")
    metric, weight = extra.pop("metric", None), extra.pop("x_weight", 0.5)
    if metric == "x":
        options["hidden_weight"] = 1.0
    elif metric in ("hk+x", "keys+x"):
        options["hidden_weight"] = weight
    return options, extra


@contextlib.contextmanager
def variant(
    model,
    layers: list[float] | None = None,
    protect_sep: bool = False,
    prop_scale: float | None = None,
):
    """Swap handle parts for per-layer ratios, a scaled proportional attention and [SEP]
    protection (see the module docstring)."""
    handle = T.handle_of(model)
    current = {}
    original_bias = M.outlier_bias
    if prop_scale is not None:
        bias_of = handle.attention_bias

        def scaled_bias(call, dtype):
            bias = bias_of(call, dtype)
            if bias is None:
                return None
            finite = bias > torch.finfo(dtype).min / 2
            return torch.where(finite, bias * prop_scale, bias)

        handle.attention_bias = scaled_bias
    if layers is not None:
        begin = handle.begin_layer

        def begin_layer(index, x, key_mask=None):
            handle._ratio = layers[index]
            return begin(index, x, key_mask=key_mask)

        handle.begin_layer = begin_layer
    if protect_sep:
        merge_layer = handle.merge_layer

        def stash(call, x, metric):
            current["call"] = call
            return merge_layer(call, x, metric)

        def sep_bias(x, k, protected=0):
            call = current["call"]
            bias = (
                original_bias(x, k - 1, protected) if k > 1 else x.new_zeros(x.shape[:2], dtype=torch.float32)
            )
            valid = call.pass_state.key_valid  # None: no padding in this batch
            source = call.history.source
            real = source.new_full(source.shape[:1], source.shape[1]) if valid is None else valid.sum(dim=1)
            # the original [SEP] is the last real token
            where = source.gather(1, (real - 1)[:, None])
            return bias.scatter(1, where, -4.0)

        handle.merge_layer = stash
        M.outlier_bias = sep_bias
    try:
        yield
    finally:
        M.outlier_bias = original_bias
        for name in ("begin_layer", "merge_layer", "attention_bias"):
            handle.__dict__.pop(name, None)


class Bench:
    def __init__(self, lengths: list[int], limit: int, sts_pairs: int, threads: int, half: str) -> None:
        self.model = T.load_model(threads)
        self.lengths = lengths
        self.texts, self.ref = {}, {}
        for length in lengths:
            self.model.max_seq_length = length
            self.texts[length] = T.split_paragraphs(self.model, length, limit)[half]
            self.ref[length] = T.encode(self.model, self.texts[length])
        self.sts = {"calibration": T.sts_pairs(sts_pairs)[half]} if sts_pairs >= 0 else None
        if self.sts is not None:
            self.model.max_seq_length = 256
            self.sts_ref = T.sts_scores(self.model, self.sts, None)["calibration"]

    def row(self, label: str, options: dict, extra: dict) -> str:
        options, extra = as_options(options, extra)
        try:
            T.configure(self.model, options)
        except ValueError as error:  # e.g. keep_outliers, refused for text encoders since these rows ran
            return f"| {label} | refused: {error} |"
        cells = []
        for length in self.lengths:
            self.model.max_seq_length = length
            T.configure(self.model, options)
            with variant(self.model, **extra):
                emb = T.encode(self.model, self.texts[length])
                tokens = T.handle_of(self.model).tokens_per_layer
            cos = F.cosine_similarity(emb, self.ref[length])
            ideal = T.encoder_flops([length] * 7) / T.encoder_flops(tokens)
            cells.append(f"{ideal:.2f}x | {cos.mean():.4f} / {cos.min():.4f}")
        if self.sts is not None:
            self.model.max_seq_length = 256
            T.configure(self.model, options)
            with variant(self.model, **extra):
                got = T.sts_scores(self.model, self.sts, keep=True)
            cells.append(f"{got['calibration'] - self.sts_ref:+.2f}")
        T.configure(self.model, None)
        return f"| {label} | {' | '.join(cells)} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--group", nargs="*", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--lengths", nargs="*", type=int, default=[128, 256])
    parser.add_argument("--limit", type=int, default=64, help="calibration paragraphs per length")
    parser.add_argument(
        "--sts-pairs", type=int, default=1000, help="STS pairs (half are calibration); -1: none"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--half",
        default="calibration",
        choices=["calibration", "held-out"],
        help="the paragraphs and STS pairs to use (choose on calibration; held-out only to report)",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    bench = Bench(args.lengths, args.limit, args.sts_pairs, args.threads, args.half)
    print(f"<!-- {' '.join(['python experiments/text_experiments.py', *sys.argv[1:]])} -->")
    counts = ", ".join(f"{len(bench.texts[n])} at {n}" for n in args.lengths)
    print(
        f"{args.half} halves only: paragraphs {counts}"
        + (
            f"; {len(bench.sts['calibration'][0])} STS pairs (unmerged Spearman {bench.sts_ref:.2f})"
            if bench.sts
            else ""
        )
    )
    head = " | ".join(f"{n}: FLOP-ideal | {n}: cos mean / min" for n in args.lengths)
    sts = " | STS Δ Spearman" if bench.sts else ""
    for group in args.group:
        print(
            f"\n#### {group}\n\n| config | {head}{sts} |\n|---|{'---|---|' * len(args.lengths)}{'---|' if sts else ''}"
        )
        for label, options, extra in GROUPS[group]:
            print(bench.row(label, options, extra), flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
