"""Fidelity of a merged text encoder against the same model unmerged, on a file of texts.

For every schedule: the cosine similarity of each text's embedding to its unmerged embedding
(mean and min over the texts), the mean tokens per text left after the last layer, and with
sentence pairs scored by people (STS), the Spearman correlation of the embeddings' cosine with
those scores, for the unmerged model and for each schedule. Optionally the measured speedup,
timed as :func:`tome.tools.measure.text_bench.run_text_bench` does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from tome.tools.measure.bench import format_spread, noise_note
from tome.tools.measure.text_bench import run_text_bench, token_counts
from tome.tools.measure.text_metrics import cosine_stats, pair_cosines, spearman
from tome.tools.models.text import PreparedTexts, TextModel
from tome.tools.progress import progress_bar
from tome.tools.schedule_text import r_label

__all__ = ["StsInputs", "TextEvalRow", "evaluate_text", "format_table", "to_json"]


@dataclass
class StsInputs:
    """Prepared STS pairs: ``first[i]`` and ``second[i]`` are scored ``scores[i]``."""

    scores: list[float]
    first: PreparedTexts
    second: PreparedTexts


@dataclass
class TextEvalRow:
    r: str
    texts: int
    cosine: float  # mean cosine of the embeddings to the unmerged ones
    min_cosine: float
    tokens_in: float  # mean tokens per text entering the first layer
    tokens_out: float  # ... and left after the last
    sts_spearman: float | None = None  # of cosine(s1, s2) vs the human scores
    sts_pairs: int = 0
    speedup: float | None = None
    speed_spread: float | None = None


def _mean_tokens(model: TextModel, lengths: Sequence[int]) -> tuple[float, float]:
    counts = token_counts(model, lengths)
    return sum(c[0] for c in counts) / len(counts), sum(c[-1] for c in counts) / len(counts)


def evaluate_text(
    model: TextModel,
    settings: Sequence,
    texts: PreparedTexts,
    *,
    sts: StsInputs | None = None,
    patch_kwargs: dict | None = None,
    progress: bool = True,
    speed_reps: int = 0,
) -> list[TextEvalRow]:
    """Compare ``model`` patched with each setting against the unpatched model (the first
    row, ``r="0"``) on the prepared ``texts`` (and ``sts`` pairs)."""
    configs: list = [None] + [s for s in settings if s != 0]
    options = patch_kwargs or {}
    steps = len(texts.batches) + (len(sts.first.batches) + len(sts.second.batches) if sts else 0)
    bar = progress_bar(steps * len(configs), progress, "eval")
    reference: torch.Tensor | None = None
    rows = []
    for setting in configs:
        model.set_setting(setting, **options)
        embeddings = _encode(model, texts, bar)
        if reference is None:
            reference = embeddings
        mean, low = cosine_stats(embeddings, reference)
        tokens_in, tokens_out = _mean_tokens(model, texts.lengths)
        row = TextEvalRow(r_label(setting), texts.count, mean, low, tokens_in, tokens_out)
        if setting is None:
            row.cosine, row.min_cosine = 1.0, 1.0
        if sts is not None:
            predicted = pair_cosines(_encode(model, sts.first, bar), _encode(model, sts.second, bar))
            row.sts_spearman = spearman(predicted, sts.scores)
            row.sts_pairs = len(sts.scores)
        rows.append(row)
    bar.close()
    model.set_setting(None)
    if speed_reps > 0:
        timed = run_text_bench(
            model, settings, texts, reps=speed_reps, progress=progress, patch_kwargs=patch_kwargs
        )
        for row, time_row in zip(rows, timed, strict=True):
            row.speedup, row.speed_spread = time_row.speedup, time_row.spread
    return rows


def _encode(model: TextModel, prepared: PreparedTexts, bar) -> torch.Tensor:
    return model.encode(prepared, step=lambda: bar.update(1))


def _sts_cell(row: TextEvalRow, base: float | None) -> str:
    if row.sts_spearman is None or math.isnan(row.sts_spearman):
        return "–"
    text = f"{100 * row.sts_spearman:.2f}"
    if base is not None and not math.isnan(base) and row.r != "0":
        text += f" ({100 * (row.sts_spearman - base):+.2f})"
    return text


def format_table(rows: Sequence[TextEvalRow]) -> str:
    """A Markdown table; the STS column when pairs were given, speedup and spread when timed
    (and a note below when the timings were noisy)."""
    timed = any(row.speedup is not None for row in rows)
    has_sts = any(row.sts_spearman is not None for row in rows)
    base = rows[0].sts_spearman if rows else None
    head = ["schedule", "tokens in→out"]
    if timed:
        head += ["speedup", "spread"]
    head += ["cosine", "min cosine"]
    if has_sts:
        head.append("STS Spearman ×100 (Δ)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.r, f"{row.tokens_in:.1f}→{row.tokens_out:.1f}"]
        if timed:
            cells += ["–" if row.speedup is None else f"{row.speedup:.2f}x", format_spread(row.speed_spread)]
        cells += [f"{row.cosine:.4f}", f"{row.min_cosine:.4f}"]
        if has_sts:
            cells.append(_sts_cell(row, base))
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        noise_note([(row.r, row.speed_spread) for row in rows], reps_flag="--speed-reps") if timed else None
    )
    if note:
        lines.append(note)
    return "\n".join(lines)


def to_json(rows: Sequence[TextEvalRow], **meta) -> str:
    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value

    data = [{k: clean(v) for k, v in asdict(row).items()} for row in rows]
    return json.dumps({**meta, "rows": data}, indent=2)
