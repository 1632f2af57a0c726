"""Throughput of a text encoder with token merging, against the FLOP-ideal speedup.

Every repetition runs all the texts (tokenized once beforehand, in length-sorted batches as
``SentenceTransformer.encode`` makes them) through the unpatched model and then through each
schedule, in turn (interleaved, as :mod:`tome.tools.measure.bench` does for images); texts/s is the
number of texts over the median of the repetitions.

FLOPs (:func:`encoder_flops`) count the encoder layers for the real tokens of every text, from its
own length: a text's merges depend on that text alone (``model.tome.planned_tokens(n)``), so the
count is exact whatever the batch. A multiply-add counts as 2 FLOPs. Layer i of a d-wide encoder
with a d_ff-wide feed-forward, ``n`` tokens entering it and ``m`` left after its merge (tome merges
between attention and feed-forward):

    8 n d^2        query, key, value and output projections
    4 n^2 d        attention scores (Q K^T) and their weighted sum of values
    4 m d d_ff     the feed-forward's two linear layers (6 m d d_ff for ModernBERT's gated
                   feed-forward: its input projection is two d x d_ff matrices)

ModernBERT's local (sliding-window) layers count every pair too: its SDPA and eager attention
mask the pairs outside the window but still compute them. Embeddings, layer norms, softmax,
pooling and padding are not counted.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tome.tools.measure.bench import TableStyle, timing_spread
from tome.tools.measure.bench import format_table as bench_table
from tome.tools.models.text import PreparedTexts, TextModel
from tome.tools.progress import progress_bar
from tome.tools.schedule_text import r_label

__all__ = ["TextBenchRow", "encoder_flops", "format_table", "run_text_bench", "to_json", "token_counts"]


@dataclass
class TextBenchRow:
    """One line of the table; ``r`` is the schedule as written (``"0"``: unpatched)."""

    r: str
    tokens: list[float]  # mean tokens per text entering layer 0, then left after each layer
    gflops: float  # per text, mean
    texts_per_s: float
    speedup: float
    ideal: float  # FLOP-ideal speedup: FLOPs of the unpatched model / FLOPs here
    efficiency: float  # speedup / ideal
    seconds: list[float] = field(default_factory=list)  # every timed run over all the texts
    spread: float | None = None  # (slowest - fastest) / median of ``seconds``


def encoder_flops(tokens: Sequence[int], width: int, ffn_width: int, *, gated: bool = False) -> float:
    """FLOPs of one text through the encoder layers: ``tokens[i]`` enter layer i and
    ``tokens[i + 1]`` are left after its merge (the module docstring has the formula);
    ``gated``: a gated feed-forward (ModernBERT's GLU, three d x d_ff matrices instead of two).

    >>> encoder_flops([4, 3], width=2, ffn_width=3)  # 8*4*2^2 + 4*4^2*2 + 4*3*2*3
    328.0
    >>> encoder_flops([4, 3], width=2, ffn_width=3, gated=True)  # ... + 6*3*2*3
    364.0
    """
    d, f = width, ffn_width
    ffn = 6 if gated else 4
    total = 0
    for n, m in itertools.pairwise(tokens):
        total += 8 * n * d * d + 4 * n * n * d + ffn * m * d * f
    return float(total)


def token_counts(model: TextModel, lengths: Sequence[int]) -> list[list[int]]:
    """Per text: tokens entering layer 0, then after each layer, under the model's current
    setting."""
    cache: dict[int, list[int]] = {}
    return [cache.setdefault(n, model.planned_tokens(n)) for n in lengths]


def _flops_and_tokens(model: TextModel, lengths: Sequence[int]) -> tuple[float, list[float]]:
    """Total FLOPs over the texts, and mean tokens per layer."""
    counts = token_counts(model, lengths)
    flops = sum(encoder_flops(c, model.width, model.ffn_width, gated=model.gated_ffn) for c in counts)
    mean = [sum(column) / len(counts) for column in zip(*counts, strict=True)]
    return flops, mean


def run_text_bench(
    model: TextModel,
    settings: Sequence,
    texts: PreparedTexts,
    *,
    reps: int = 5,
    warmup: int = 1,
    progress: bool = True,
    patch_kwargs: dict | None = None,
) -> list[TextBenchRow]:
    """Time ``model`` unpatched and patched with each setting (``r`` schedules or
    :class:`~tome.tools.schedule_text.Ratio`; ``0`` is the unpatched row) on the prepared
    texts, with the :func:`tome.patch` options ``patch_kwargs``. ``warmup``: untimed runs of the
    first batch per setting. Returns the unpatched row first."""
    configs: list = [None] + [s for s in settings if s != 0]
    options = patch_kwargs or {}
    if not texts.batches:
        raise ValueError("run_text_bench: no texts")
    work: dict[int, tuple[float, list[float]]] = {}
    for index, setting in enumerate(configs):
        model.set_setting(setting, **options)
        work[index] = _flops_and_tokens(model, texts.lengths)
        for _ in range(max(warmup, 1)):
            model.embed(texts.batches[0][1])
    times: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    bar = progress_bar(reps * len(configs), progress, "bench")
    for _ in range(reps):
        for index, setting in enumerate(configs):
            model.set_setting(setting, **options)
            start = time.perf_counter()
            model.run(texts)
            times[index].append(time.perf_counter() - start)
            bar.update(1)
    bar.close()
    model.set_setting(None)

    base_tps = texts.count / statistics.median(times[0])
    rows = []
    for index, setting in enumerate(configs):
        flops, tokens = work[index]
        tps = texts.count / statistics.median(times[index])
        ideal = work[0][0] / flops
        speedup = tps / base_tps
        rows.append(
            TextBenchRow(
                r=r_label(setting),
                tokens=tokens,
                gflops=flops / texts.count / 1e9,
                texts_per_s=tps,
                speedup=speedup,
                ideal=ideal,
                efficiency=speedup / ideal,
                seconds=times[index],
                spread=timing_spread(times[index]),
            )
        )
    return rows


def format_table(rows: Sequence[TextBenchRow], per_layer: bool = True, *, gated: bool = False) -> str:
    """A Markdown table, then a note when the timings were noisy, then the mean tokens per text
    after each layer (:func:`tome.tools.measure.bench.format_table` with the texts' columns);
    ``gated``: the FLOPs were counted for a gated feed-forward (ModernBERT)."""
    ffn = "6md·d_ff per layer (gated feed-forward)" if gated else "4md·d_ff per layer"
    style = TableStyle(
        schedule="schedule",
        tokens="tokens in→out",
        rate="texts/s",
        rate_field="texts_per_s",
        count="{:.1f}",
        gflops="{:.3f}",
        note="(tokens: mean real tokens per text entering the first layer → left after the last; GFLOPs per "
        f"text in the encoder layers, a multiply-add counted as 2: 8nd² + 4n²d + {ffn}; "
        "spread: (slowest - fastest) / median of the timed runs)",
        per_layer="mean tokens per text after each layer:",
    )
    return bench_table(rows, per_layer, style=style)


def to_json(rows: Sequence[TextBenchRow], **meta) -> str:
    return json.dumps({**meta, "rows": [asdict(row) for row in rows]}, indent=2)
