"""``tome embed``: one embedding per image (or per line of a text file) of a whole collection,
into one parquet file (a path or a ``pyarrow.fs`` URI), resumable; on a Ray cluster when one machine
is not enough (:mod:`tome.tools.embed.on_ray`: the workers write the parts).

The file has one row per item: ``path`` (images: the absolute path) or ``id`` (texts:
``FILE:LINE``, the absolute path of the text file and the line number), and ``embedding``
(a list of float32). Its schema metadata (key ``tome``) records the model, the merge setting and
the options that made it, so that a rerun can tell whether it may add to it.

How nothing is lost and nothing is done twice:

- rows are written as they finish, in chunks of ``chunk`` rows, into ``OUT.parts/`` beside
  ``OUT``: each chunk is written to a hidden temporary file, flushed to disk and renamed into
  ``part-NNNNNN.parquet`` (a rename is atomic), so a part file is whole or absent;
- a rerun with the same ``OUT`` first checks that the model and settings are those of the rows
  already written (else it stops: mixing embeddings of two models is never what one wants), drops
  leftover temporary files and unreadable parts, skips every item already written, and does the
  rest;
- at the end the rows of ``OUT`` (from an earlier run) and of the parts are written into a
  temporary file renamed to ``OUT`` (each key once, in input order), and ``OUT.parts/`` is removed;
- an image that cannot be read is skipped: its path and the reason are in the summary and in
  ``OUT.skipped.tsv``, and the command exits with status 3 (it is tried again by the next run).

Decoding and resizing run in a thread pool (Pillow releases the GIL while it decodes and resizes)
ahead of the model, which runs in the calling thread; the job times both, so the summary says
which one bounds the throughput.

The parts, one job each: :mod:`~tome.tools.embed.inputs` (the items; decoding an image, or the
reason it cannot be read), :mod:`~tome.tools.embed.model` (the setting; the patched model and
its metadata), :mod:`~tome.tools.embed.store` (the parquet file, its parts and the resume),
:mod:`~tome.tools.embed.place` (a path or a ``pyarrow.fs`` URI; writing a file whole or absent),
:mod:`~tome.tools.embed.local` (the local runners and the chunk writer), :mod:`~tome.tools.embed.on_ray`
(the Ray runner); this module holds the job that ties them together.

>>> import tempfile, torch
>>> from pathlib import Path
>>> from tome.tools.data import demo_images
>>> out = Path(tempfile.mkdtemp()) / "photos.parquet"
>>> torch.manual_seed(0) and None
>>> result = embed(demo_images(), out, model="timm:vit_tiny_patch16_224", random_init=True,
...                img_size=64, r=1, progress=False)
>>> result.embedded, result.rows, len(read_embeddings(out)[1][0])
(3, 3, 192)
>>> embed(demo_images(), out, model="timm:vit_tiny_patch16_224", random_init=True,
...       img_size=64, r=1, progress=False).already  # a rerun: nothing left to do
3
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

# (`import X as X`: names this module had before its split, still importable from it)
from tome.tools.embed.decode import decode_image as decode_image
from tome.tools.embed.inputs import TEXT_SUFFIXES as TEXT_SUFFIXES
from tome.tools.embed.inputs import Item, image_items, is_text_job, text_items
from tome.tools.embed.local import Sink, Stats, run_images, run_texts
from tome.tools.embed.model import load_job_model, resolve_setting
from tome.tools.embed.model import pixels_for as pixels_for
from tome.tools.embed.store import FORMAT as FORMAT
from tome.tools.embed.store import IDENTITY as IDENTITY
from tome.tools.embed.store import META_KEY as META_KEY
from tome.tools.embed.store import Store, check_before_load, check_out, read_embeddings
from tome.tools.errors import UserError

__all__ = [
    "EXIT_SKIPPED",
    "EmbedResult",
    "Item",
    "Store",
    "embed",
    "image_items",
    "read_embeddings",
    "text_items",
]

# The exit status of a job that finished but skipped items (2 is for bad input, nothing written).
EXIT_SKIPPED = 3


@dataclass
class EmbedResult:
    """What a job did. ``rows``: rows in the file now; ``embedded``: rows this run added;
    ``already``: items found written before; ``skipped``: ``(key, reason)`` of the items that
    could not be read; ``decode_s`` / ``model_s``: seconds spent decoding and preprocessing (summed
    over the worker threads or Ray tasks) and in the model; ``wait_s``: seconds the model waited
    for input (local runs)."""

    out: Path | str  # a path, or the pyarrow.fs URI given
    kind: str
    rows: int
    embedded: int
    already: int
    skipped: list[tuple[str, str]]
    seconds: float
    decode_s: float
    model_s: float
    wait_s: float
    metadata: dict
    runner: str = "local"
    skipped_file: Path | str | None = None
    load_s: float = 0.0  # of ``seconds``: loading (and patching) the model
    # of ``seconds``: from the start until the first row was done (the job's fixed start: loading
    # the model and, on Ray, starting Ray, its workers and the model's actors), and stopping Ray
    first_row_s: float = 0.0
    stop_s: float = 0.0
    # of ``seconds``: until the last row was done; rows of the first batch
    last_row_s: float = 0.0
    first_rows: int = 0
    # rows/s after the fixed start: the rows after the first batch over the time from the first
    # row to the last (on Ray: summed over the actors, each from its own first row)
    steady_items_per_s: float = 0.0
    retried: int = 0  # Ray: parts tried again because their actor's node was lost
    nodes_lost: list[str] = field(default_factory=list)  # Ray: nodes where an actor died holding parts
    # CPU seconds of this process from the model loaded to the file written (on Ray: the driver's),
    # and of them (Ray) the fixed part: until the first actor was ready (the model put in Ray's store)
    driver_cpu_s: float = 0.0
    driver_start_cpu_s: float = 0.0
    # Ray, of ``seconds``: when a lost part was first noticed, when the last one retried was written
    lost_s: float | None = None
    recovered_s: float | None = None

    @property
    def items_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_share(self) -> float:
        """Decoding's share of the work (decode / (decode + model))."""
        total = self.decode_s + self.model_s
        return self.decode_s / total if total > 0 else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(
            out=str(self.out),
            skipped=[{"key": k, "reason": r} for k, r in self.skipped],
            skipped_file=str(self.skipped_file) if self.skipped_file else None,
            items_per_s=self.items_per_s,
            decode_share=self.decode_share,
        )
        return data

    def summary(self) -> str:
        unit = "images" if self.kind == "image" else "texts"
        line = (
            f"{self.out}: {self.rows} rows; this run embedded {self.embedded} {unit} in {self.seconds:.1f}s "
            f"({self.items_per_s:.1f}/s; {self.load_s:.1f}s of it loading the model, the first row after "
            f"{self.first_row_s:.1f}s; {self.runner}), "
            f"{self.already} already there, "
            f"{len(self.skipped)} skipped"
        )
        if self.nodes_lost or self.retried:
            lost = ", ".join(self.nodes_lost) or "none"
            line += f"; actors lost on: {lost}, {self.retried} part(s) retried"
        if self.model_s > 0:
            line += (
                f"; decoding {self.decode_s:.1f}s, model {self.model_s:.1f}s: decoding is "
                f"{100 * self.decode_share:.0f}% of the work"
            )
        return line


def embed(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    model: str | None = None,
    r=None,
    ratio=None,
    texts: bool | None = None,
    batch: int = 32,
    chunk: int = 512,
    workers: int | None = None,
    threads: int | None = None,
    weights: str | Path | None = None,
    random_init: bool = False,
    img_size: int | None = None,
    max_tokens: int | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    ray_actors: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    **options,
) -> EmbedResult:
    """Embed every image under ``inputs`` (or every line of the text files ``inputs``) into the
    parquet file ``out``; rerun with the same ``out`` to finish an interrupted job. Returns an
    :class:`EmbedResult`; raises :class:`~tome.tools.errors.UserError` (nothing written) for bad
    input: a missing path, an empty folder, an ``out`` that cannot be written or whose rows another
    model or setting made.

    Args:
        model: a ``--model`` spec (default: ``dinov2-s-saliency`` for images, ``text:minilm``
            for texts). Images give the model's pooled / CLS feature (what ``tome eval``
            compares); texts the sentence-transformers embedding.
        r, ratio: the merge setting, as :func:`tome.patch` takes it or as ``--r`` / ``--ratio``
            write it (``"16:-0.75"``); 0: unmerged. Default ``r=16`` (images), ``ratio=0.1``
            (texts).
        texts: the inputs are text files (default: when the model is ``text:`` or every input
            is a ``.txt`` file).
        batch: items per forward pass; chunk: rows per part file (what a crash can lose).
        workers: decoding threads beside the model (default: ``min(4, cpu count)``; on Ray, in
            each actor); threads: torch's (on Ray, each actor's; default: its node's cores).
        ray, ray_address, ray_actors: run on Ray (:mod:`tome.tools.embed.on_ray`: the actors write
            the parts): a local Ray started for the job, or the cluster at ``ray_address``;
            ``ray_actors`` model copies (default: one per node).
        on_chunk: called (on the driver) with the rows embedded so far after each part is written.
        options: :func:`tome.patch` options (``mode``, ``metric``, ...).

    The example at the top of :mod:`tome.tools.embed.job` runs it.
    """
    import torch

    from tome.tools.progress import progress_bar

    start = time.perf_counter()
    say = log or (lambda line: None)
    inputs = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    if not inputs:
        raise UserError("give images, folders or text files to embed")
    for name, value in {"batch": batch, "chunk": chunk, "workers": workers, "threads": threads}.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"--{name} must be an integer >= 1, got {value!r}")
    if ray_actors is not None and ray_actors < 1:
        raise UserError(f"--ray-actors must be >= 1, got {ray_actors}")
    kind = "text" if is_text_job(inputs, model, texts) else "image"
    setting = resolve_setting(r, ratio, text=kind == "text")
    items = text_items(inputs) if kind == "text" else image_items(inputs)
    path = check_out(out)
    if importlib_missing("pyarrow"):
        raise UserError("tome embed writes parquet: pip install pyarrow (or 'tome-merging[ray]')")
    if (ray or ray_address) and importlib_missing("ray"):
        raise UserError("--ray needs Ray: pip install 'tome-merging[ray]'")
    # a rerun with another setting is refused before the model loads (and again, whole, after)
    check_before_load(path, _known_meta(kind, setting, options, weights, random_init, img_size, max_tokens))
    if threads is not None:
        torch.set_num_threads(threads)
    load_start = time.perf_counter()
    load = partial(
        load_job_model,
        kind,
        model,
        setting,
        options,
        weights=weights,
        random_init=random_init,
        img_size=img_size,
        max_tokens=max_tokens,
        log=say,
    )
    use_ray = bool(ray or ray_address)
    ray_started = False
    stop_s = 0.0
    try:
        if use_ray:
            from tome.tools.embed.on_ray import start_ray

            # The model loads while Ray starts (ray.init must run in the main thread).
            with ThreadPoolExecutor(1, thread_name_prefix="tome-load") as pool:
                loading = pool.submit(load)
                try:
                    ray_started = start_ray(ray_address)
                finally:
                    loaded, meta = loading.result()
        else:
            loaded, meta = load()
        load_s = time.perf_counter() - load_start
        store = Store(path, meta, log=lambda line: say(f"tome: {line}"))
        store.check()  # before anything is written
        done = store.open()
        pending = [item for item in items if item.key not in done]
        already = len(items) - len(pending)
        stats = Stats()
        unit = "img" if kind == "image" else "text"
        bar = progress_bar(len(items), progress, "embed", unit=unit, initial=already)
        runner = "local"
        work_start = time.process_time()
        try:
            if pending and use_ray:
                from tome.tools.embed.on_ray import run_ray

                runner = run_ray(
                    loaded, items, done, store, stats, bar, batch=batch, chunk=chunk, actors=ray_actors,
                    threads=threads, workers=workers, on_chunk=on_chunk, log=say,
                )  # fmt: skip
            else:
                sink = Sink(store, chunk, stats, bar, on_chunk)
                if pending and kind == "image":
                    workers = workers or min(4, os.cpu_count() or 1)
                    run_images(loaded, pending, sink, stats, batch=batch, workers=workers)
                elif pending:
                    run_texts(loaded, pending, sink, stats, batch=batch, chunk=chunk)
                sink.close()
        finally:
            bar.close()
            work_cpu_s = time.process_time() - work_start
    finally:
        if ray_started:
            from tome.tools.embed.on_ray import stop_ray

            stop_start = time.perf_counter()
            stop_ray()
            stop_s = time.perf_counter() - stop_start
    finish_start = time.process_time()
    rows = store.finish([item.key for item in items])
    driver_cpu_s = work_cpu_s + time.process_time() - finish_start
    skipped_file = store.write_skipped(stats.skipped)
    return EmbedResult(
        out=path,
        kind=kind,
        rows=rows,
        embedded=stats.embedded,
        already=already,
        skipped=stats.skipped,
        seconds=time.perf_counter() - start,
        decode_s=stats.decode_s,
        model_s=stats.model_s,
        wait_s=stats.wait_s,
        metadata=meta,
        runner=runner,
        skipped_file=skipped_file,
        load_s=load_s,
        first_row_s=stats.first_row_at - start if stats.first_row_at is not None else 0.0,
        stop_s=stop_s,
        last_row_s=stats.last_row_at - start if stats.last_row_at is not None else 0.0,
        first_rows=stats.first_rows,
        steady_items_per_s=_steady(stats),
        retried=stats.retried,
        nodes_lost=list(stats.nodes_lost),
        driver_cpu_s=driver_cpu_s,
        driver_start_cpu_s=0.0 if stats.ready_cpu is None else stats.ready_cpu - work_start,
        lost_s=None if stats.lost_at is None else stats.lost_at - start,
        recovered_s=None if stats.recovered_at is None else stats.recovered_at - start,
    )


def _steady(stats: Stats) -> float:
    if stats.steady_rate is not None:
        return stats.steady_rate
    if stats.first_row_at is None or stats.last_row_at is None or stats.last_row_at <= stats.first_row_at:
        return 0.0
    return (stats.embedded - stats.first_rows) / (stats.last_row_at - stats.first_row_at)


def _known_meta(kind: str, setting, options: dict, weights, random_init, img_size, max_tokens) -> dict:
    """What :func:`~tome.tools.embed.model.load_job_model`'s metadata will say that is known before
    the model loads: not the model's name, nor what the model brings (its default input size or
    text length, the merge options not given)."""
    import json

    from tome.tools.schedule_text import setting_label

    known = {
        "format": FORMAT,
        "kind": kind,
        "setting": setting_label(setting),
        "options": json.loads(json.dumps({k: v for k, v in options.items() if v is not None}, default=str)),
    }
    if kind == "text":
        known.update(weights=None, random_init=False, img_size=None)
        if max_tokens is not None:
            known["max_tokens"] = max_tokens
    else:
        known.update(weights=os.path.abspath(weights) if weights else None, random_init=bool(random_init))
        known["max_tokens"] = None
        if img_size is not None and img_size > 0:  # else refused when the model loads
            known["img_size"] = img_size
    return known


def importlib_missing(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is None
