"""``tome embed``: one embedding per image (or per line of a text file) of a whole collection,
into one parquet file, resumable; on Ray Data when one machine is not enough
(:mod:`tome.tools.embed.on_ray`).

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
  temporary file renamed to ``OUT`` (each key once), and ``OUT.parts/`` is removed;
- an image that cannot be read is skipped: its path and the reason are in the summary and in
  ``OUT.skipped.tsv``, and the command exits with status 3 (it is tried again by the next run).

Decoding and resizing run in a thread pool (Pillow releases the GIL while it decodes and resizes)
ahead of the model, which runs in the calling thread; the job times both, so the summary says
which one bounds the throughput.

The parts, one job each: :mod:`~tome.tools.embed.inputs` (the items; decoding an image, or the
reason it cannot be read), :mod:`~tome.tools.embed.model` (the setting; the patched model and
its metadata), :mod:`~tome.tools.embed.store` (the parquet file, its parts and the resume),
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
from dataclasses import asdict, dataclass
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

    out: Path
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
    skipped_file: Path | None = None
    load_s: float = 0.0  # of ``seconds``: loading (and patching) the model
    # of ``seconds``: from the start until the first row was done (the job's fixed start: loading
    # the model and, on Ray, starting Ray, its workers and the model's actors), and stopping Ray
    first_row_s: float = 0.0
    stop_s: float = 0.0

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
        workers: decoding threads (default: ``min(4, cpu count)``); on Ray, decoding tasks at
            a time (default: one per 4 CPUs of the cluster); threads: torch's.
        ray, ray_address, ray_actors: run on Ray Data (:mod:`tome.tools.embed.on_ray`): a local
            Ray started for the job, or the cluster at ``ray_address``; ``ray_actors`` model
            copies (default: one per node).
        on_chunk: called with the rows embedded so far after each part is written.
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
        raise UserError("--ray needs Ray Data: pip install 'tome-merging[ray]'")
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
            from tome.tools.embed.on_ray import run_ray, start_ray

            # The model loads while Ray starts (ray.init must run in the main thread).
            with ThreadPoolExecutor(1, thread_name_prefix="tome-load") as pool:
                loading = pool.submit(_import_ray_data_then, load)
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
        sink = Sink(store, chunk, stats, bar, on_chunk)
        runner = "local"
        try:
            if pending and use_ray:
                runner = run_ray(
                    loaded, kind, pending, sink, stats, batch=batch, actors=ray_actors, threads=threads,
                    workers=workers, log=say,
                )  # fmt: skip
            elif pending and kind == "image":
                workers = workers or min(4, os.cpu_count() or 1)
                run_images(loaded, pending, sink, stats, batch=batch, workers=workers)
            elif pending:
                run_texts(loaded, pending, sink, stats, batch=batch, chunk=chunk)
            sink.close()
        finally:
            bar.close()
    finally:
        if ray_started:
            from tome.tools.embed.on_ray import stop_ray

            stop_start = time.perf_counter()
            stop_ray()
            stop_s = time.perf_counter() - stop_start
    rows = store.finish()
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
    )


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


def _import_ray_data_then(load: Callable):
    """``load()``, after importing Ray Data (1-2 s of imports done while Ray starts, not after)."""
    import ray.data  # noqa: F401

    return load()


def importlib_missing(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is None
