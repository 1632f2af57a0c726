"""Agreement of a merged vision-language model with the same model unmerged, on your images and
prompts (``tome eval --prompts FILE``).

Every image goes with every prompt, one at a time (batch 1: each answer is the model's own,
with no padding). For each setting (``visual_tokens`` / ``visual_ratio``) and each pair:

- first-token top-1 agreement: the merged model's most likely first answer token is the
  unmerged model's;
- first-token KL: ``KL(unmerged || merged)`` of the first answer token's distribution (nats);
- exact answers: the greedy answer (``max_new_tokens`` tokens, or up to the end token) is the
  unmerged model's, token for token;
- tokens read: the prompt the language model reads (the prefill), and of it the visual tokens
  per image;
- time to first token (``generate(max_new_tokens=1)``: vision tower, merge, prefill), the
  median of ``speed_reps`` rounds, each timing the unmerged model and every setting one after
  the other on the same first pairs, and its speedup over the unmerged model.

>>> row = VlmEvalRow("visual_tokens=64", 4, 70.0, 64.0, 0.75, 0.1, 0.5)
>>> print(format_table([row]))  # doctest: +NORMALIZE_WHITESPACE
| setting | pairs | tokens read | visual tokens / image | first-token top-1 | first-token KL | exact answers |
|---|---|---|---|---|---|---|
| visual_tokens=64 | 4 | 70.0 | 64.0 | 75.0% | 0.1000 | 50.0% |
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from tome.tools.measure.bench import format_spread, noise_note, timing_spread
from tome.tools.progress import progress_bar

__all__ = ["VlmEvalRow", "evaluate_vlm", "format_table", "setting_label", "to_json"]

# Pairs timed for the time to first token (the first ones): enough to average a few prompt
# lengths, few enough that timing stays a small part of the run.
TIMED_PAIRS = 4


@dataclass
class VlmEvalRow:
    setting: str
    pairs: int
    prefill_tokens: float  # mean tokens the language model reads in the prefill
    visual_tokens: float  # ... of which visual tokens, per image
    top1_agreement: float | None = None  # first answer token, against the unmerged model
    first_token_kl: float | None = None  # KL(unmerged || merged), nats, mean over the pairs
    exact_answers: float | None = None  # greedy answers equal token for token
    ttft_ms: float | None = None  # time to first token, median
    speedup: float | None = None  # of the time to first token, over the unmerged model
    speed_spread: float | None = None


def setting_label(setting: dict) -> str:
    """``{"visual_tokens": 64}`` -> ``"visual_tokens=64"``; ``{}`` -> ``"unmerged"``."""
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "unmerged"


@dataclass
class _Answer:
    first_logits: torch.Tensor  # (vocab,) float32
    answer: torch.Tensor  # the new tokens
    prefill: int  # tokens the language model read in the prefill


def _answer(model, inputs: dict, max_new_tokens: int) -> _Answer:
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        return_dict_in_generate=True,
        output_logits=True,
    )
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    # the cache holds the prefill and every new token but the last
    prefill = int(cache.get_seq_length()) - (new.shape[0] - 1)
    return _Answer(out.logits[0][0].float(), new, prefill)


def _kl(reference: torch.Tensor, merged: torch.Tensor) -> float:
    p = torch.log_softmax(reference, -1)
    q = torch.log_softmax(merged, -1)
    return float((p.exp() * (p - q)).sum())


def evaluate_vlm(
    model,
    pairs: Sequence[Callable[[], dict]],
    settings: Sequence[dict],
    *,
    image_token_id: int,
    max_new_tokens: int = 16,
    speed_reps: int = 3,
    progress: bool = False,
) -> list[VlmEvalRow]:
    """Compare ``model`` (unpatched, left unpatched) merged at each of ``settings`` (``tome.patch``
    keywords) with itself unmerged on ``pairs`` (each a function giving the processor's inputs
    for one image and one prompt). The first row is the unmerged model."""
    import tome

    if not settings:
        raise ValueError("settings: expected at least one setting, got none")
    results: dict[str, list[_Answer]] = {}
    placeholders: list[int] = []  # per pair: the image's placeholder tokens in the prompt
    bar = progress_bar(len(pairs) * (len(settings) + 1), progress, "eval", unit="answer")
    labels = ["unmerged"] + [setting_label(s) for s in settings]
    with torch.inference_mode():
        for make in pairs:
            inputs = make()
            placeholders.append(int((inputs["input_ids"] == image_token_id).sum()))
            results.setdefault("unmerged", []).append(_answer(model, inputs, max_new_tokens))
            bar.update()
            tome.patch(model, **settings[0])
            try:
                for label, setting in zip(labels[1:], settings, strict=True):
                    _set(model, setting)
                    results.setdefault(label, []).append(_answer(model, inputs, max_new_tokens))
                    bar.update()
            finally:
                tome.unpatch(model)
        bar.close()
        times = _ttft(model, [pairs[i]() for i in range(min(TIMED_PAIRS, len(pairs)))], settings, speed_reps)
    rows = []
    reference = results["unmerged"]
    for label in labels:
        answers = results[label]
        merged = label != "unmerged"
        # one image a pair: its placeholders less what the prefill lost
        visual = [
            n - (r.prefill - a.prefill) for a, r, n in zip(answers, reference, placeholders, strict=True)
        ]
        row = VlmEvalRow(
            label,
            len(answers),
            statistics.fmean(a.prefill for a in answers),
            statistics.fmean(visual),
        )
        if merged:
            row.top1_agreement = statistics.fmean(
                float(a.first_logits.argmax() == r.first_logits.argmax())
                for a, r in zip(answers, reference, strict=True)
            )
            row.first_token_kl = statistics.fmean(
                _kl(r.first_logits, a.first_logits) for a, r in zip(answers, reference, strict=True)
            )
            row.exact_answers = statistics.fmean(
                float(torch.equal(a.answer, r.answer)) for a, r in zip(answers, reference, strict=True)
            )
        if times:
            seconds = times[label]
            row.ttft_ms = 1000 * statistics.median(seconds)
            row.speedup = statistics.median(times["unmerged"]) / statistics.median(seconds)
            row.speed_spread = timing_spread(seconds)
        rows.append(row)
    return rows


def _set(model, setting: dict) -> None:
    for name, value in setting.items():
        setattr(model.tome, name, value)


def _ttft(model, timed: list[dict], settings: Sequence[dict], reps: int) -> dict[str, list[float]]:
    """Seconds to the first token over the ``timed`` inputs, per setting label, ``reps``
    interleaved rounds (the unmerged model first in each), after one untimed warm-up round."""
    import tome

    if not reps or not timed:
        return {}
    times: dict[str, list[float]] = {}

    def once() -> float:
        start = time.perf_counter()
        for inputs in timed:
            model.generate(**inputs, max_new_tokens=1, do_sample=False, num_beams=1)
        return time.perf_counter() - start

    for rep in range(reps + 1):
        measured = {"unmerged": once()}
        tome.patch(model, **settings[0])
        try:
            for setting in settings:
                _set(model, setting)
                measured[setting_label(setting)] = once()
        finally:
            tome.unpatch(model)
        if rep:  # the first round warms up
            for label, seconds in measured.items():
                times.setdefault(label, []).append(seconds)
    return times


def _fmt(value: float | None, digits: int = 4, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


def format_table(rows: Sequence[VlmEvalRow]) -> str:
    """A Markdown table; the timing columns when measured, with a note below when the timed
    runs spread widely."""
    timed = any(row.speedup is not None for row in rows)
    columns: list[tuple[str, Callable[[VlmEvalRow], str]]] = [
        ("setting", lambda row: row.setting),
        ("pairs", lambda row: str(row.pairs)),
        ("tokens read", lambda row: f"{row.prefill_tokens:.1f}"),
        ("visual tokens / image", lambda row: f"{row.visual_tokens:.1f}"),
    ]
    if timed:
        columns += [
            ("time to first token", lambda row: "–" if row.ttft_ms is None else f"{row.ttft_ms:.1f} ms"),
            ("speedup", lambda row: "–" if row.speedup is None else f"{row.speedup:.2f}x"),
            ("spread", lambda row: format_spread(row.speed_spread)),
        ]
    columns += [
        ("first-token top-1", lambda row: _fmt(row.top1_agreement, percent=True)),
        ("first-token KL", lambda row: _fmt(row.first_token_kl)),
        ("exact answers", lambda row: _fmt(row.exact_answers, percent=True)),
    ]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(get(row) for _, get in columns) + " |" for row in rows]
    note = (
        noise_note([(row.setting, row.speed_spread) for row in rows], reps_flag="--speed-reps")
        if timed
        else None
    )
    if note:
        lines.append(note)
    return "\n".join(lines)


def to_json(rows: Sequence[VlmEvalRow], **meta) -> str:
    return json.dumps({**meta, "rows": [asdict(row) for row in rows]}, indent=2)
