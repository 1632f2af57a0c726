"""Throughput of a model with token merging, against the FLOP-ideal speedup.

Runs are interleaved (every repetition times the unpatched model and each ``r`` once, in
turn), so slow drifts of the machine (thermal, other processes) hit every setting alike, and
the median over repetitions is reported. FLOPs are counted from the token count entering
every block (attention) and left after its merge (MLP), with the model's own width and
layer sizes.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from tome.tools.progress import progress_bar

__all__ = [
    "NOISY_SPREAD",
    "BenchRow",
    "TableStyle",
    "block_macs",
    "flops_per_image",
    "format_spread",
    "format_table",
    "noise_note",
    "plot",
    "run_bench",
    "timing_spread",
]

NOISY_SPREAD = 0.10  # timed runs spread wider than this (of their median): the note says so


@dataclass
class BenchRow:
    """One line of the table. ``r`` is the schedule as written (``"0"`` = unpatched model,
    ``"ratio=0.2"`` for ``tome.patch(ratio=0.2)``)."""

    r: str
    tokens: list[int]  # tokens entering block 0, then left after each block
    gflops: float  # per image
    images_per_s: float
    speedup: float
    ideal: float  # FLOP-ideal speedup: GFLOPs of the unpatched model / GFLOPs here
    efficiency: float  # speedup / ideal
    seconds: list[float] = field(default_factory=list)  # every timed batch
    spread: float | None = None  # (slowest - fastest) / median of ``seconds``; None for one run


# -- how noisy the timings were ----------------------------------------------------------------


def timing_spread(seconds: Sequence[float]) -> float | None:
    """How far repeated timings of one setting spread: ``(slowest - fastest) / median``; None
    for fewer than 2 runs.

    >>> timing_spread([1.0, 1.1, 0.9])
    0.2
    >>> timing_spread([0.5]) is None
    True
    """
    if len(seconds) < 2:
        return None
    middle = statistics.median(seconds)
    if not middle > 0:
        return None
    return round((max(seconds) - min(seconds)) / middle, 12)


def format_spread(value: float | None) -> str:
    """A table cell: ``"4%"``, ``"–"`` when not measured.

    >>> format_spread(0.042), format_spread(None)
    ('4%', '–')
    """
    return "–" if value is None else f"{100 * value:.0f}%"


def _named(label: str) -> str:
    """A table's schedule label in a sentence: ``"16"`` -> ``"r=16"``; ``"ratio=0.2"`` as it is."""
    return label if "=" in label else f"r={label}"


def noise_note(
    labelled: Sequence[tuple[str, float | None]],
    *,
    reps_flag: str = "--reps",
    threshold: float = NOISY_SPREAD,
) -> str | None:
    """One line saying that the timings were noisy, or None when every spread is within
    ``threshold``. ``labelled``: ``(schedule label, spread)`` per row.

    >>> noise_note([("0", 0.03), ("16", 0.02)]) is None
    True
    >>> print(noise_note([("0", 0.03), ("16", 0.25), ("8", 0.12)]))  # doctest: +NORMALIZE_WHITESPACE
    note: noisy timings: the timed runs of r=16 spread over 25% of their median (r=8: 12%; more than 10%),
    so the speedups may be off by as much; rerun with more --reps, on an idle machine, or with
    --threads below the number of cores
    """
    noisy = sorted(
        ((value, label) for label, value in labelled if value is not None and value > threshold), reverse=True
    )
    if not noisy:
        return None
    (worst, label), others = noisy[0], noisy[1:]
    also = "".join(f"{_named(other)}: {format_spread(value)}; " for value, other in others[:3])
    if len(others) > 3:
        also += f"{len(others) - 3} more; "
    return (
        f"note: noisy timings: the timed runs of {_named(label)} spread over {format_spread(worst)} of their "
        f"median ({also}more than {format_spread(threshold)}), so the speedups may be off by "
        f"as much; rerun with more {reps_flag}, on an idle machine, or with --threads below the number of cores"
    )


def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def block_macs(block: nn.Module, width: int) -> tuple[int, int]:
    """Multiply-accumulates per token of one block: ``(attention projections, MLP)``.

    Attention projections are q, k, v and output (4 C^2); the MLP is every linear layer of
    the block outside its attention module (so fc1 + fc2, or SwiGLU's three)."""
    mlp = 0
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and not any(s in name for s in ("attn", "attention")):
            mlp += module.in_features * module.out_features
    return 4 * width * width, mlp


def flops_per_image(model, tokens: Sequence[int]) -> float:
    """FLOPs (2 x MACs) of one image through patch embedding and all blocks, given the tokens
    entering block 0 and left after each block (``model.tome.tokens_per_layer``).

    Block i: attention projections and the two attention matmuls (N_in^2 C each) on the
    N_in = tokens[i] tokens entering it; the MLP on the N_out = tokens[i + 1] tokens left after
    its merge (ToMe merges between attention and MLP).
    """
    blocks = model.blocks
    C = model.width
    if len(tokens) != len(blocks) + 1:
        raise ValueError(f"tokens: expected {len(blocks) + 1} counts, got {len(tokens)}")
    macs = model.num_patches * C * 3 * model.patch_size**2  # patch embedding
    for i, block in enumerate(blocks):
        attn, mlp = block_macs(block, C)
        n_in, n_out = tokens[i], tokens[i + 1]
        macs += n_in * attn + 2 * n_in * n_in * C + n_out * mlp
    return 2.0 * macs


def _time_once(model, pixels: torch.Tensor) -> float:
    start = time.perf_counter()
    model.run_backbone(pixels)
    return time.perf_counter() - start


def run_bench(
    model,
    rs: Sequence,
    *,
    batch: int = 32,
    reps: int = 5,
    warmup: int = 1,
    progress: bool = True,
    seed: int = 0,
    patch_kwargs: dict | None = None,
) -> list[BenchRow]:
    """Time ``model`` (a :class:`tome.tools.models.vision.Model`) unpatched and patched with each schedule in
    ``rs`` (with the :func:`tome.patch` options ``patch_kwargs``); returns the unpatched row
    first. Inputs are random normal pixels (merging decisions on noise are as costly as on
    photos: the work depends only on token counts)."""
    from tome.tools.schedule_text import r_label

    configs: list = [None] + [r for r in rs if r != 0]
    options = patch_kwargs or {}
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, model.img_size, model.img_size, generator=generator)
    tokens: dict[int, list[int]] = {}
    for index, r in enumerate(configs):
        model.set_r(r, unmerge_output=False, **options) if r is not None else model.set_r(None)
        for _ in range(max(warmup, 1)):
            model.run_backbone(pixels)
        if r is None:
            n0 = model.protected + model.num_patches
            tokens[index] = [n0] * (len(model.blocks) + 1)
        else:
            tokens[index] = list(model.module.tome.tokens_per_layer)
    times: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    bar = progress_bar(reps * len(configs), progress, "bench")
    for _ in range(reps):
        for index, r in enumerate(configs):
            model.set_r(r, unmerge_output=False, **options) if r is not None else model.set_r(None)
            times[index].append(_time_once(model, pixels))
            bar.update(1)
    bar.close()
    model.set_r(None)

    flops = {i: flops_per_image(model, tokens[i]) for i in tokens}
    base_ips = batch / statistics.median(times[0])
    rows = []
    for index, r in enumerate(configs):
        ips = batch / statistics.median(times[index])
        ideal = flops[0] / flops[index]
        speedup = ips / base_ips
        rows.append(
            BenchRow(
                r=r_label(r),
                tokens=tokens[index],
                gflops=flops[index] / 1e9,
                images_per_s=ips,
                speedup=speedup,
                ideal=ideal,
                efficiency=speedup / ideal,
                seconds=times[index],
                spread=timing_spread(times[index]),
            )
        )
    return rows


@dataclass(frozen=True)
class TableStyle:
    """What differs between speed tables (images here, texts in :mod:`tome.tools.measure.text_bench`):
    the column names, how token counts and GFLOPs are written, the row field holding the
    throughput, the note under the table and the title of the per-layer token counts."""

    schedule: str = "r"
    tokens: str = "tokens"
    rate: str = "images/s"
    rate_field: str = "images_per_s"
    count: str = "{}"  # one token count (images: ints; texts: means over the texts)
    gflops: str = "{:.2f}"
    note: str = (
        "(GFLOPs per image, a multiply-add counted as 2 FLOPs; fvcore and the ToMe paper count 1. "
        "spread: (slowest - fastest) / median of the timed runs)"
    )
    per_layer: str = "tokens after each block:"


def format_table(rows: Sequence, per_layer: bool = True, *, style: TableStyle = TableStyle()) -> str:
    """A Markdown table (pastes into a README as is), then a note when the timings were noisy
    (see :func:`noise_note`), then the tokens after each block (``per_layer``). ``rows``: with
    the fields of :class:`BenchRow` (``style.rate_field`` for the throughput)."""
    head = f"| {style.schedule} | {style.tokens} | GFLOPs | {style.rate} | spread | speedup | FLOP-ideal | efficiency |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    count, gflops = style.count.format, style.gflops.format
    for row in rows:
        lines.append(
            f"| {row.r} | {count(row.tokens[0])}→{count(row.tokens[-1])} | {gflops(row.gflops)} | "
            f"{getattr(row, style.rate_field):.1f} | {format_spread(row.spread)} | {row.speedup:.2f}x | "
            f"{row.ideal:.2f}x | {100 * row.efficiency:.0f}% |"
        )
    lines.append(style.note)
    note = noise_note([(row.r, row.spread) for row in rows])
    if note:
        lines.append(note)
    if per_layer:
        lines.append("")
        lines.append(style.per_layer)
        width = max(len(_named(row.r)) for row in rows)
        for row in rows:
            lines.append(f"  {_named(row.r):<{width}}  " + " ".join(count(t) for t in row.tokens[1:]))
    return "\n".join(lines)


def to_json(rows: Sequence[BenchRow], **meta) -> str:
    return json.dumps({**meta, "rows": [asdict(row) for row in rows]}, indent=2)


def plot(rows: Sequence[BenchRow], path, title: str = "") -> None:
    """Two panels: tokens after each block per r; measured vs FLOP-ideal speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for row in rows:
        left.plot(range(len(row.tokens)), row.tokens, marker="o", markersize=3, label=_named(row.r))
    left.set_xlabel("block")
    left.set_ylabel("tokens (after block; 0 = input)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    x = range(len(rows))
    right.bar([i - 0.2 for i in x], [row.ideal for row in rows], width=0.4, label="FLOP-ideal", color="#bbb")
    right.bar(
        [i + 0.2 for i in x], [row.speedup for row in rows], width=0.4, label="measured", color="#1f77b4"
    )
    right.set_xticks(list(x), [row.r for row in rows])
    right.set_xlabel("r" if all("=" not in row.r for row in rows) else "schedule")
    right.set_ylabel("speedup vs unpatched")
    right.axhline(1.0, color="k", lw=0.5)
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
