"""Fidelity of a merged model against the same model unmerged, on a folder of images.

For every image and schedule ``r``: cosine similarity of the pooled/CLS features, mean cosine
similarity of the patch features (merged tokens given back to every patch they hold), top-1
agreement of classifiers, Pearson correlation of dense saliency maps (models with the saliency
head). When the folder is labelled (ImageFolder layout: one sub-folder per class), accuracy too:
a classifier's top-1 when the folder names match its classes (WordNet ids or class names), and
for every model a k-NN classifier on the pooled features, trained on half of each class.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["EvalRow", "Labels", "evaluate", "format_table", "knn_accuracy", "labels_for", "pearson"]


@dataclass
class Labels:
    """Classes of a labelled folder: ``targets[i]`` is the class of image i (index into
    ``classes``); ``model_index[c]`` the model's class for folder class c (None: no match);
    ``train[i]``: image i is in the k-NN train split."""

    classes: list[str]
    targets: list[int]
    train: list[bool]
    model_index: list[int | None]


@dataclass
class EvalRow:
    r: str
    images: int
    cls_cosine: float
    patch_cosine: float
    top1_agreement: float | None = None
    saliency_corr: float | None = None
    accuracy: float | None = None  # classifier top-1 on the labelled folder
    knn_accuracy: float | None = None
    min_cls_cosine: float = math.nan
    tokens: int = 0  # tokens left after the last block
    speedup: float | None = None  # measured, as tome bench (evaluate(speed_reps=...))
    speed_spread: float | None = None  # (slowest - fastest) / median of those timed runs
    extra: dict = field(default_factory=dict)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson correlation of two (B, ...) tensors."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


def _model_aliases(model) -> list[set[str]] | None:
    if not model.labels:
        return None
    aliases = []
    for i, label in enumerate(model.labels):
        names = {_norm(label)} | {_norm(part) for part in label.split(",")}
        if model.synsets:
            names.add(model.synsets[i].lower())
        aliases.append(names)
    return aliases


def _relative(path: Path, root: Path) -> Path | None:
    """``path`` below ``root``, read from the paths as given (a class folder may be a symlink to
    somewhere else), else from the resolved paths; None when it is not below ``root``."""
    for a, b in (
        (Path(os.path.abspath(path)), Path(os.path.abspath(root))),
        (path.resolve(), root.resolve()),
    ):
        try:
            return a.relative_to(b)
        except ValueError:
            continue
    return None


def labels_for(paths: Sequence[Path], root: Path, model=None, train_fraction: float = 0.5) -> Labels | None:
    """Labels from an ImageFolder layout (every image one level under ``root/CLASS/``; class
    folders may be symlinks), or None when the folder is not labelled like that (or has fewer
    than 2 classes)."""
    classes_of = []
    for path in paths:
        rel = _relative(path, root)
        if rel is None:
            return None
        if len(rel.parts) != 2:
            return None
        classes_of.append(rel.parts[0])
    classes = sorted(set(classes_of))
    if len(classes) < 2:
        return None
    index = {c: i for i, c in enumerate(classes)}
    targets = [index[c] for c in classes_of]
    train = [False] * len(paths)
    for c in range(len(classes)):
        members = [i for i, t in enumerate(targets) if t == c]
        n_train = (
            min(len(members) - 1, max(1, round(len(members) * train_fraction))) if len(members) > 1 else 0
        )
        for i in members[:n_train]:
            train[i] = True
    model_index: list[int | None] = [None] * len(classes)
    aliases = _model_aliases(model) if model is not None else None
    if aliases:
        lookup: dict[str, int] = {}
        for k, names in enumerate(aliases):
            for name in names:
                lookup.setdefault(name, k)
        model_index = [lookup.get(c.lower(), lookup.get(_norm(c))) for c in classes]
    return Labels(classes, targets, train, model_index)


def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int = 20
) -> float:
    """Weighted k-NN (cosine similarity, weights exp(sim / 0.07), as DINO) accuracy."""
    if len(train_x) == 0 or len(test_x) == 0:
        return math.nan
    sims = F.normalize(test_x.float(), dim=-1) @ F.normalize(train_x.float(), dim=-1).T
    k = min(k, len(train_x))
    top, idx = sims.topk(k, dim=1)
    weights = (top / 0.07).exp()
    classes = int(max(train_y.max(), test_y.max())) + 1
    votes = torch.zeros(len(test_x), classes, dtype=weights.dtype)
    votes.scatter_add_(1, train_y[idx], weights)
    return (votes.argmax(1) == test_y).float().mean().item()


def evaluate(
    model,
    load: Callable[[int], object],
    count: int,
    rs: Sequence,
    *,
    batch: int = 16,
    labels: Labels | None = None,
    knn_k: int = 20,
    progress: bool = True,
    patch_kwargs: dict | None = None,
    speed_reps: int = 0,
) -> list[EvalRow]:
    """Compare ``model`` (a :class:`tome.tools.models.vision.Model`) patched with each ``r`` against the
    unpatched model on ``count`` images, ``load(i)`` giving image i (a PIL image), with the
    :func:`tome.patch` options ``patch_kwargs``. Returns the unmerged reference row (``r="0"``)
    first, then one row per schedule.

    With ``speed_reps > 0``, every row also gets its measured ``speedup``, timed as
    :func:`tome.tools.measure.bench.run_bench` does (the backbone on a batch of ``batch`` random images, its
    output not unmerged, one warm-up pass, median of ``speed_reps`` interleaved runs)."""
    from tome.tools.schedule_text import r_label

    configs = [None] + [r for r in rs if r != 0]
    sums = {i: {"cls": [], "patch": [], "agree": [], "sal": [], "correct": []} for i in range(len(configs))}
    feats: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(configs))}
    final_tokens: dict[int, int] = {}
    targets = torch.tensor(labels.targets) if labels is not None else None
    mapped = None
    if labels is not None and any(m is not None for m in labels.model_index) and model.num_classes:
        mapped = torch.tensor([-1 if m is None else m for m in labels.model_index])

    bar = _bar(math.ceil(count / batch) * len(configs), progress)
    for start in range(0, count, batch):
        images = [load(i) for i in range(start, min(start + batch, count))]
        pixels = model.preprocess(images)
        reference = None
        for index, r in enumerate(configs):
            model.set_r(r, **(patch_kwargs or {})) if r is not None else model.set_r(None)
            out = model(pixels)
            bar.update(1)
            final_tokens[index] = (
                model.protected + model.num_patches if r is None else model.module.tome.tokens_per_layer[-1]
            )
            feats[index].append(out.pooled.float())
            acc = sums[index]
            if mapped is not None and out.logits is not None:
                want = mapped[targets[start : start + len(images)]]
                keep = want >= 0
                acc["correct"].append((out.logits.argmax(-1)[keep] == want[keep]).float())
            if reference is None:
                reference = out
                continue
            acc["cls"].append(F.cosine_similarity(out.pooled.float(), reference.pooled.float(), dim=-1))
            acc["patch"].append(
                F.cosine_similarity(out.patches.float(), reference.patches.float(), dim=-1).mean(1)
            )
            if out.logits is not None and reference.logits is not None:
                acc["agree"].append((out.logits.argmax(-1) == reference.logits.argmax(-1)).float())
            if out.saliency is not None and reference.saliency is not None:
                acc["sal"].append(pearson(out.saliency, reference.saliency))
    bar.close()
    model.set_r(None)
    speedups: list[float | None] = [None] * len(configs)
    spreads: list[float | None] = [None] * len(configs)
    if speed_reps > 0:
        from tome.tools.measure.bench import run_bench

        timed = run_bench(
            model, rs, batch=batch, reps=speed_reps, progress=progress, patch_kwargs=patch_kwargs
        )
        speedups = [row.speedup for row in timed]
        spreads = [row.spread for row in timed]

    def mean(values: list[torch.Tensor]) -> float | None:
        return torch.cat(values).mean().item() if values else None

    rows = []
    for index, r in enumerate(configs):
        acc = sums[index]
        is_ref = index == 0
        cls = torch.cat(acc["cls"]) if acc["cls"] else torch.ones(count)
        row = EvalRow(
            r=r_label(r),
            images=count,
            cls_cosine=1.0 if is_ref else cls.mean().item(),
            patch_cosine=1.0 if is_ref else mean(acc["patch"]),
            top1_agreement=(1.0 if model.num_classes else None) if is_ref else mean(acc["agree"]),
            saliency_corr=(1.0 if model.head is not None else None) if is_ref else mean(acc["sal"]),
            accuracy=mean(acc["correct"]),
            min_cls_cosine=1.0 if is_ref else cls.min().item(),
            tokens=final_tokens.get(index, 0),
            speedup=speedups[index],
            speed_spread=spreads[index],
        )
        if labels is not None:
            x = torch.cat(feats[index])
            train = torch.tensor(labels.train)
            if train.any() and (~train).any():
                row.knn_accuracy = knn_accuracy(x[train], targets[train], x[~train], targets[~train], knn_k)
        rows.append(row)
    return rows


def _bar(total: int, enabled: bool):
    from tome.tools.progress import progress_bar

    return progress_bar(total, enabled, "eval")


def _fmt(value: float | None, digits: int = 4, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


def format_table(rows: Sequence[EvalRow]) -> str:
    """A Markdown table; columns that do not apply to the model are left out. With measured
    speedups, the spread of their timed runs too, and a note below when it is large (see
    :func:`tome.tools.measure.bench.noise_note`)."""
    from tome.tools.measure.bench import format_spread, noise_note

    timed = any(row.speedup is not None for row in rows)
    columns: list[tuple[str, Callable[[EvalRow], str]]] = [
        ("r", lambda row: row.r),
        ("tokens left", lambda row: str(row.tokens)),
    ]
    if timed:
        columns.append(("speedup", lambda row: "–" if row.speedup is None else f"{row.speedup:.2f}x"))
        columns.append(("spread", lambda row: format_spread(row.speed_spread)))
    columns += [
        ("CLS cosine", lambda row: _fmt(row.cls_cosine)),
        ("min CLS cosine", lambda row: _fmt(row.min_cls_cosine)),
        ("patch cosine", lambda row: _fmt(row.patch_cosine)),
    ]
    if any(row.top1_agreement is not None for row in rows):
        columns.append(("top-1 agreement", lambda row: _fmt(row.top1_agreement, percent=True)))
    if any(row.saliency_corr is not None for row in rows):
        columns.append(("saliency corr.", lambda row: _fmt(row.saliency_corr)))
    if any(row.accuracy is not None for row in rows):
        columns.append(("top-1 acc.", lambda row: _fmt(row.accuracy, percent=True)))
    if any(row.knn_accuracy is not None for row in rows):
        columns.append(("k-NN acc.", lambda row: _fmt(row.knn_accuracy, percent=True)))
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(get(row) for _, get in columns) + " |")
    note = (
        noise_note([(row.r, row.speed_spread) for row in rows], reps_flag="--speed-reps") if timed else None
    )
    if note:
        lines.append(note)
    return "\n".join(lines)


def to_json(rows: Sequence[EvalRow], **meta) -> str:
    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value

    data = [{k: clean(v) for k, v in asdict(row).items()} for row in rows]
    return json.dumps({**meta, "rows": data}, indent=2)
