"""Token merging after ONNX export: onnxruntime speed and agreement with eager PyTorch.

The shared DINOv2-S/14 (``../shared/models/dinov2-small-saliency``, transformers
``Dinov2Model`` with ``attn_implementation="sdpa"``, 224 px, 257 tokens) is patched with
``tome.patch`` at r = 16, (16, -0.75) and (16, -1.0) (and left unpatched, the r = 0 row), each
copy wrapped in a module that returns ``last_hidden_state`` (default; the merged tokens, e.g.
(B, 65, 384) at r = 16) or ``pooler_output`` (``--output pooler_output``), exported with
``torch.onnx.export(wrapper, (pixels,), dynamo=True)`` at a fixed batch and run in onnxruntime
(``CPUExecutionProvider``, default session options and threads).

Inputs are the first ``--batch`` real photos of ``../shared/images/imagenet-samples`` (RGB,
bicubic resize to 224x224, /255, ImageNet mean and std; the same batch for export, checks and
timing). For every schedule the script

1. checks onnxruntime's output against the eager PyTorch output of the same patched model:
   the max abs difference, which should be below 1e-4 of the output's largest magnitude. For
   images over that, a second export that also returns every block's source map shows whether
   onnxruntime merged differently, from which block on, and how close eager's decision there
   was: a merge decided by a score gap below 1e-5 (a near-tie) can go either way under float32
   rounding, and one flipped merge moves the whole image's output by ~1e-2. The script exits
   with an error if an image is over the tolerance with the same merges as eager, or with
   merges that differ without a near-tie; and
2. times one batch in onnxruntime and in eager PyTorch (``torch.inference_mode``, torch's
   default threads), interleaved: every repetition runs each schedule once in onnxruntime and
   once in eager PyTorch, with a short pause (``--pause``) before each timed run so that the
   other runtime's spinning worker threads have gone idle; after one untimed warm-up run of
   each. The table shows medians of ``--reps``.

Columns: tokens entering block 0 -> left after the last block; ORT images/s; ORT speedup
(over the unpatched model in onnxruntime); eager PyTorch speedup (over the unpatched model in
eager PyTorch, same process, same repetitions); max abs diff (onnxruntime vs eager, over all
images; "(k/B images over)" counts the images over the tolerance, which the notes under the
table explain one by one).

    python benchmarks/export_speed.py                    # batch 32, 5 reps: ~3.5 min on 2 idle cores
    python benchmarks/export_speed.py --batch 4 --reps 1 # a smoke run
    python benchmarks/export_speed.py --clock cpu        # on a shared machine (see below)

``--clock cpu`` times the CPU seconds of the calling thread (``time.thread_time``) with one torch
thread and one onnxruntime thread (``intra_op_num_threads=1``: onnxruntime then runs every node
on the calling thread): on a machine shared with other jobs, wall-clock medians of 2-thread runs
swing by 2x or more; one thread's CPU time does much less (it still feels the caches other jobs
share).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tome  # noqa: E402

SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "dinov2-small-saliency"
IMAGES = SHARED / "images" / "imagenet-samples"
SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# (label, r): None is the unpatched model (r = 0).
SCHEDULES = [("0 (unpatched)", None), ("16", 16), ("(16, -0.75)", (16, -0.75)), ("(16, -1.0)", (16, -1.0))]
TOLERANCE = 1e-4  # max abs difference / max |eager output|
NEAR_TIE = 1e-5  # a merge decision closer than this (cosine score gap) is up to float rounding
# The timer and onnxruntime's threads (0: its default); ``--clock cpu`` changes both.
CLOCK = time.perf_counter
ORT_THREADS = 0


class Backbone(nn.Module):
    """``pixels -> last_hidden_state`` (or ``pooler_output``) of a transformers ``Dinov2Model``."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=pixels), self.output)


def photo_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))


def load_photos(folder: Path, count: int) -> torch.Tensor:
    """The first ``count`` photos of ``folder`` (sorted by name), preprocessed: (count, 3, 224, 224)."""
    from PIL import Image

    paths = photo_paths(folder)
    if len(paths) < count:
        raise SystemExit(f"{folder}: {len(paths)} photos, --batch {count} needs as many")
    arrays = []
    for path in paths[:count]:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
            arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((pixels - mean) / std).contiguous()


class WithSources(Backbone):
    """:class:`Backbone` that also returns every block's source map ``(B, N0)`` (which merged
    token holds each original token) of its pass: the merge decisions, to compare between
    runtimes. Reads the pass state the handle keeps of the latest pass (``model.tome._last``,
    set while the export traces too); not library API."""

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = super().forward(pixels)
        return (out, *[history.source for history in self.model.tome._last.histories])


def session_of(wrapper: nn.Module, pixels: torch.Tensor):
    import onnxruntime as ort

    program = torch.onnx.export(wrapper, (pixels,), dynamo=True, verbose=False)
    options = ort.SessionOptions()
    if ORT_THREADS:
        options.intra_op_num_threads = ORT_THREADS
        options.inter_op_num_threads = ORT_THREADS
    return ort.InferenceSession(
        program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def decision_margin(metric: torch.Tensor, r: int, protected: int) -> float:
    """How close one block's merge decisions on one image (``metric`` (1, N, D)) were to going
    another way: the smallest score gap between the r-th and (r+1)-th best A token, or between
    a chosen A token's best and second-best B partner (bipartite soft matching on cosine
    similarity, as ``tome.core.merge``)."""
    keys = F.normalize(metric[0, protected:].float(), dim=-1)
    scores = keys[0::2] @ keys[1::2].T
    best = scores.amax(dim=-1).sort(descending=True)
    gaps = [float("inf")]
    if r < best.values.shape[0]:
        gaps.append(float(best.values[r - 1] - best.values[r]))
    if scores.shape[1] > 1:
        top2 = scores[best.indices[:r]].topk(2, dim=-1).values
        gaps.append(float((top2[:, 0] - top2[:, 1]).min()))
    return min(gaps)


class Case:
    """One schedule: its eager wrapper, its onnxruntime session, its check and timings."""

    def __init__(self, label: str, r, base: nn.Module, output: str, pixels: torch.Tensor, log) -> None:
        self.label, self.r, self.output = label, r, output
        self.model = base if r is None else tome.patch(copy.deepcopy(base), r=r)
        self.wrapper = Backbone(self.model, output).eval()
        with torch.inference_mode():
            reference = self.wrapper(pixels)
        if r is None:
            n0 = (SIZE // self.model.config.patch_size) ** 2 + 1  # patches + class token
            self.tokens = [n0] * (len(self.model.encoder.layer) + 1)
        else:
            self.tokens = list(self.model.tome.tokens_per_layer)
        start = time.perf_counter()
        self.session = session_of(self.wrapper, pixels)
        log(f"  {label}: exported in {time.perf_counter() - start:.0f} s")
        self.feed = {self.session.get_inputs()[0].name: pixels.numpy()}
        (out,) = self.session.run(None, self.feed)
        if out.shape != tuple(reference.shape):
            raise SystemExit(f"{label}: onnxruntime gives {out.shape}, eager {tuple(reference.shape)}")
        diff = np.abs(out - reference.numpy())
        self.image_diff = diff.reshape(diff.shape[0], -1).max(axis=1)  # per image
        self.max_diff = float(diff.max())
        self.scale = float(reference.abs().max())
        self.notes: list[str] = []
        self.ok = True
        self.ort_times: list[float] = []
        self.eager_times: list[float] = []

    def over(self) -> list[int]:
        """Images whose onnxruntime output differs from eager beyond the tolerance."""
        return [int(i) for i in np.nonzero(~(self.image_diff < TOLERANCE * self.scale))[0]]

    def diagnose(self, pixels: torch.Tensor, names: list[str], log) -> None:
        """For images over the tolerance: do onnxruntime's merge decisions differ from eager's,
        in which block first, and how close eager's decision there was (a near-tie that float
        rounding can flip explains the difference; identical merges do not)."""
        over = self.over()
        if not over:
            return
        if self.r is None:
            self.ok = False
            self.notes.append(f"{len(over)} of {len(names)} images over the tolerance (unpatched)")
            return
        handle = self.model.tome
        metrics: dict[int, torch.Tensor] = {}
        merge_layer = handle.merge_layer

        def keep_metric(call, x, metric):
            if metric is not None:
                metrics[call.index] = metric.clone()
            return merge_layer(call, x, metric)

        probe = WithSources(self.model, self.output).eval()
        handle.merge_layer = keep_metric
        try:
            with torch.inference_mode():
                eager = [t.clone() for t in probe(pixels)]
        finally:
            del handle.merge_layer  # the instance attribute: back to the class's method
        start = time.perf_counter()
        session = session_of(probe, pixels)
        log(
            f"  {self.label}: checked the merges of {len(over)} image(s) ({time.perf_counter() - start:.0f} s)"
        )
        ort_sources = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[1:]
        same = np.ones(len(names), dtype=bool)
        first_block = {}
        for block, (ours, theirs) in enumerate(zip(ort_sources, eager[1:], strict=True)):
            equal = (ours == theirs.numpy()).all(axis=1)
            for i in np.nonzero(same & ~equal)[0]:
                first_block[int(i)] = block
            same &= equal
        for i in over:
            text = f"{names[i]} (max abs diff {self.image_diff[i]:.1e})"
            if i not in first_block:
                self.ok = False
                self.notes.append(f"{text}: the same merges in every block, yet over the tolerance")
                continue
            block = first_block[i]
            r = handle.layer_r(block, metrics[block].shape[1])
            margin = decision_margin(metrics[block][i : i + 1], r, handle.protected)
            near_tie = margin < NEAR_TIE
            self.ok &= near_tie
            self.notes.append(
                f"{text}: merges differ from eager's first in block {block}, where eager's closest "
                f"decision had a score gap of {margin:.1e}"
                + (" (a near-tie: float32 rounding decides it)" if near_tie else " (NOT a near-tie)")
            )
        if same.any():
            self.notes.append(
                f"over the {int(same.sum())} images with eager's merges in every block: max abs diff "
                f"{float(self.image_diff[same].max()):.1e}"
            )

    def time_ort(self) -> float:
        start = CLOCK()
        self.session.run(None, self.feed)
        return CLOCK() - start

    def time_eager(self, pixels: torch.Tensor) -> float:
        with torch.inference_mode():
            start = CLOCK()
            self.wrapper(pixels)
            return CLOCK() - start


def load_text(load_start: float) -> str:
    """The machine's 1-minute load average at the start and at the end: other jobs' share of the
    CPUs (with 2 cores, wall-clock timings of 2-thread runs are unreliable above ~2.5)."""
    return f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} CPUs)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per schedule (default 5)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument(
        "--output",
        choices=("last_hidden_state", "pooler_output"),
        default="last_hidden_state",
        help="what the exported wrapper returns (default last_hidden_state)",
    )
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--images", default=str(IMAGES))
    parser.add_argument(
        "--pause", type=float, default=0.2, help="seconds of pause before every timed run (default 0.2)"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: CPU seconds of the calling thread (time.thread_time), 1 torch and 1 onnxruntime thread",
    )
    args = parser.parse_args()
    if args.reps < 1 or args.batch < 1:
        parser.error("--reps and --batch: expected at least 1")
    global CLOCK, ORT_THREADS
    if args.clock == "cpu":
        CLOCK, ORT_THREADS = time.thread_time, 1
        torch.set_num_threads(1)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    import onnxruntime as ort
    from transformers import Dinov2Model

    torch.manual_seed(0)
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    pixels = load_photos(Path(args.images), args.batch)
    base = Dinov2Model.from_pretrained(args.model, attn_implementation="sdpa").eval()
    log(f"exporting {len(SCHEDULES)} models (batch {args.batch}, output {args.output})")
    cases = [Case(label, r, base, args.output, pixels, log) for label, r in SCHEDULES]

    names = [p.name for p in photo_paths(Path(args.images))[: args.batch]]
    for case in cases:
        case.diagnose(pixels, names, log)
    with torch.inference_mode():
        for case in cases:  # warm-up
            case.time_ort()
            case.time_eager(pixels)
        for rep in range(args.reps):
            for case in cases:
                time.sleep(args.pause)
                case.ort_times.append(case.time_ort())
                time.sleep(args.pause)
                case.eager_times.append(case.time_eager(pixels))
            log(
                f"  rep {rep + 1}/{args.reps}: "
                + ", ".join(
                    f"{c.label} ORT {c.ort_times[-1]:.2f}s eager {c.eager_times[-1]:.2f}s" for c in cases
                )
            )

    ort_base = statistics.median(cases[0].ort_times)
    eager_base = statistics.median(cases[0].eager_times)
    ort_threads = f"{ORT_THREADS} thread" if ORT_THREADS else "default threads"
    per = "s" if args.clock == "wall" else "CPU s"
    print(
        f"DINOv2-S/14 (transformers, sdpa) {SIZE} px, batch {args.batch}, fp32, output {args.output}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__} "
        f"(CPUExecutionProvider, {ort_threads}); {args.clock} clock, medians of {args.reps} interleaved runs\n"
    )
    print(f"| schedule | tokens | ORT images/{per} | ORT speedup | eager PyTorch speedup | max abs diff |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        ort_median = statistics.median(case.ort_times)
        eager_median = statistics.median(case.eager_times)
        mark = f" ({len(case.over())}/{args.batch} images over)" if case.over() else ""
        print(
            f"| {case.label} | {case.tokens[0]}→{case.tokens[-1]} | {args.batch / ort_median:.1f} | "
            f"{ort_base / ort_median:.2f}x | {eager_base / eager_median:.2f}x | {case.max_diff:.1e}{mark} |"
        )
    print(
        f"\nunpatched: onnxruntime {args.batch / ort_base:.1f} images/{per}, eager PyTorch "
        f"{args.batch / eager_base:.1f} images/{per}. Tolerance: max abs diff < {TOLERANCE:g} x max |output| "
        f"({', '.join(f'{c.label}: {TOLERANCE * c.scale:.1e}' for c in cases)})."
    )
    for case in cases:
        for note in case.notes:
            print(f"- {case.label}: {note}")
    print(f"{time.perf_counter() - start:.0f} s in all; {load_text(load_start)}")
    failed = [c.label for c in cases if not c.ok]
    if failed:
        raise SystemExit(
            f"onnxruntime differs from eager PyTorch beyond tolerance, unexplained by near-ties: {', '.join(failed)}"
        )


if __name__ == "__main__":
    main()
