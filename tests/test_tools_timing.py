"""The spread of timed runs in ``tome bench`` / ``tome eval`` tables, and the note when it is
large (issue 16 item 4). Built from given rows: no timing is asserted."""

from __future__ import annotations

import pytest

from tome.tools.measure.bench import NOISY_SPREAD, BenchRow, format_spread, noise_note, timing_spread
from tome.tools.measure.bench import format_table as bench_table
from tome.tools.measure.eval import EvalRow
from tome.tools.measure.eval import format_table as eval_table


def _bench_row(r: str, seconds: list[float]) -> BenchRow:
    return BenchRow(
        r=r, tokens=[17, 9], gflops=1.0, images_per_s=10.0, speedup=1.0, ideal=1.0, efficiency=1.0,
        seconds=seconds, spread=timing_spread(seconds),
    )  # fmt: skip


def test_spread_is_range_over_median():
    assert timing_spread([2.0, 1.0, 1.5]) == pytest.approx(2 / 3)
    assert timing_spread([1.0, 1.0]) == 0.0
    assert timing_spread([1.0]) is None and timing_spread([]) is None
    assert timing_spread([0.0, 0.0]) is None  # no median to compare with
    assert format_spread(0.125) == "12%" and format_spread(0.0) == "0%" and format_spread(None) == "–"


def test_note_only_above_the_threshold_worst_first():
    assert noise_note([]) is None
    assert noise_note([("0", None), ("8", None)]) is None  # single runs: nothing to say
    assert noise_note([("0", NOISY_SPREAD), ("8", 0.02)]) is None  # at the threshold: quiet
    note = noise_note([("0", 0.12), ("8", 0.02), ("16", 0.4)])
    assert note.startswith("note: noisy timings: the timed runs of r=16 spread over 40% of their median")
    assert "(r=0: 12%; more than 10%)" in note and "r=8" not in note
    assert "more --reps" in note and "\n" not in note
    assert "more --speed-reps" in noise_note([("8", 0.5)], reps_flag="--speed-reps")
    assert noise_note([("8", 0.05)], threshold=0.01) is not None
    many = noise_note([(str(r), 0.2 + r / 100) for r in range(6)])
    assert "r=5 spread over 25%" in many and "2 more;" in many


def test_bench_table_has_a_spread_column_and_the_note_when_noisy():
    quiet = bench_table([_bench_row("0", [1.0, 1.02, 0.99]), _bench_row("8", [0.5, 0.51])])
    lines = quiet.splitlines()
    assert lines[0] == "| r | tokens | GFLOPs | images/s | spread | speedup | FLOP-ideal | efficiency |"
    assert lines[2].split(" | ")[4] == "3%" and lines[3].split(" | ")[4] == "2%"
    assert "spread: (slowest - fastest) / median of the timed runs" in quiet
    assert "note:" not in quiet
    noisy = bench_table([_bench_row("0", [1.0, 1.3, 1.0]), _bench_row("8", [0.5])], per_layer=False)
    assert "| 8 | 17→9 | 1.00 | 10.0 | – |" in noisy  # one run: no spread
    note = [line for line in noisy.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "r=0 spread over 30%" in note[0]


def test_eval_table_spread_only_with_measured_speedups():
    rows = [
        EvalRow(r="0", images=4, cls_cosine=1.0, patch_cosine=1.0, speedup=1.0, speed_spread=0.02),
        EvalRow(r="8", images=4, cls_cosine=0.99, patch_cosine=0.98, speedup=1.3, speed_spread=0.31),
    ]
    table = eval_table(rows)
    assert table.splitlines()[0].startswith("| r | tokens left | speedup | spread | CLS cosine |")
    assert "| 8 | 0 | 1.30x | 31% |" in table
    assert table.splitlines()[-1].startswith("note: noisy timings: the timed runs of r=8 spread over 31%")
    assert "--speed-reps" in table.splitlines()[-1]
    untimed = [EvalRow(r="0", images=4, cls_cosine=1.0, patch_cosine=1.0)]
    assert "spread" not in eval_table(untimed) and "note:" not in eval_table(untimed)
