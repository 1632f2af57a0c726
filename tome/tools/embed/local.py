"""Running a ``tome embed`` job on this machine: the rows' way to the file (:class:`Sink`, which
writes parts of ``chunk`` rows in input order and ticks the progress bar), the counters shared
with the Ray runner (:class:`Stats`), and the local runners for images and texts.

Images: decoding and resizing run in a thread pool (Pillow releases the GIL while it decodes and
resizes) ahead of the model, which runs in the calling thread. Texts: the next group is
tokenized in a thread while the model embeds this one. Both time the input side and the model,
so the summary says which one bounds the throughput.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tome.tools.embed.decode import decode_image
from tome.tools.embed.inputs import Item
from tome.tools.embed.model import pixels_for
from tome.tools.embed.store import Store

__all__ = ["Sink", "Stats", "run_images", "run_texts"]


@dataclass
class Stats:
    """Counters shared by the local and the Ray runner."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    embedded: int = 0
    decode_s: float = 0.0
    model_s: float = 0.0
    wait_s: float = 0.0
    first_row_at: float | None = None  # time.perf_counter() when the first row was done
    first_rows: int = 0  # rows done then (the first batch)
    last_row_at: float | None = None  # time.perf_counter() when the last row was done
    retried: int = 0  # Ray: parts tried again (their actor's node lost)
    nodes_lost: list[str] = field(default_factory=list)  # Ray: nodes where an actor died holding parts
    steady_rate: float | None = None  # Ray: rows/s after each actor's first batch, summed
    ready_cpu: float | None = None  # Ray: time.process_time() when the first actor was ready
    lost_at: float | None = None  # Ray: time.perf_counter() when a lost part was first noticed
    recovered_at: float | None = None  # Ray: ... when the last part tried again was written


class Sink:
    """Collects finished rows and writes them in parts of ``chunk`` rows, in the order given."""

    def __init__(self, store: Store, chunk: int, stats: Stats, bar, on_chunk: Callable[[int], None] | None):
        self.store, self.chunk, self.stats, self.bar, self.on_chunk = store, chunk, stats, bar, on_chunk
        self.keys: list[str] = []
        self.rows: list = []

    def add(self, keys: Sequence[str], embeddings, *, tick: bool = True) -> None:
        """Rows ``keys`` with ``embeddings`` (n, D) float32; parts are written as they fill."""
        if self.stats.first_row_at is None:
            self.stats.first_rows = len(keys)
        self._first_row()
        self.stats.last_row_at = time.perf_counter()
        self.keys.extend(keys)
        self.rows.extend(embeddings)
        if tick:
            self.bar.update(len(keys))
        while len(self.keys) >= self.chunk:
            self._flush(self.chunk)

    def skip(self, key: str, reason: str) -> None:
        self._first_row()
        self.stats.skipped.append((key, reason))
        self.bar.update(1)

    def _first_row(self) -> None:
        if self.stats.first_row_at is None:
            self.stats.first_row_at = time.perf_counter()

    def _flush(self, n: int) -> None:
        import numpy as np

        keys, rows = self.keys[:n], self.rows[:n]
        del self.keys[:n], self.rows[:n]
        self.store.write(keys, np.stack(rows))
        self.stats.embedded += len(keys)
        if self.on_chunk is not None:
            self.on_chunk(self.stats.embedded)

    def close(self) -> None:
        if self.keys:
            self._flush(len(self.keys))


def run_images(model, items: Sequence[Item], sink: Sink, stats: Stats, *, batch: int, workers: int) -> None:
    import numpy as np

    size, crop = model.img_size, model.crop_pct

    def load(item: Item):
        start = time.perf_counter()
        pixels, reason = decode_image(item.path, size, crop)
        return pixels, reason, time.perf_counter() - start

    pool = ThreadPoolExecutor(workers, thread_name_prefix="tome-decode")
    try:
        window: deque = deque()
        pending = iter(items)
        ahead = max(2 * batch, 4 * workers)  # decoded ahead of the model: it never waits if decoding keeps up

        def fill() -> None:
            while len(window) < ahead:
                item = next(pending, None)
                if item is None:
                    return
                window.append((item, pool.submit(load, item)))

        fill()
        keys: list[str] = []
        images: list = []
        while window:
            item, future = window.popleft()
            fill()
            start = time.perf_counter()
            pixels, reason, seconds = future.result()
            stats.wait_s += time.perf_counter() - start
            stats.decode_s += seconds
            if reason is not None:
                sink.skip(item.key, reason)
            else:
                keys.append(item.key)
                images.append(pixels)
            if keys and (len(keys) == batch or not window):
                start = time.perf_counter()
                pooled = model(pixels_for(model, np.stack(images)), saliency=False).pooled
                stats.model_s += time.perf_counter() - start
                sink.add(keys, pooled.float().numpy())
                keys, images = [], []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_texts(model, items: Sequence[Item], sink: Sink, stats: Stats, *, batch: int, chunk: int) -> None:
    import torch

    groups = [items[i : i + chunk] for i in range(0, len(items), chunk)]

    def prepare(group: Sequence[Item]):
        start = time.perf_counter()
        prepared = model.prepare([item.text for item in group], batch)
        return prepared, time.perf_counter() - start

    # Tokenizing the next group (longest texts first within it, as sentence-transformers does)
    # runs while the model embeds this one; rows are written in the input order.
    with ThreadPoolExecutor(1, thread_name_prefix="tome-tokenize") as pool:
        futures = deque(pool.submit(prepare, group) for group in groups[:2])
        for index, group in enumerate(groups):
            start = time.perf_counter()
            prepared, seconds = futures.popleft().result()
            stats.wait_s += time.perf_counter() - start
            stats.decode_s += seconds
            if index + 2 < len(groups):
                futures.append(pool.submit(prepare, groups[index + 2]))
            out = None
            for rows, features in prepared.batches:
                start = time.perf_counter()
                values = model.embed(features).float()
                stats.model_s += time.perf_counter() - start
                if out is None:
                    out = torch.empty(len(group), values.shape[-1])
                out[rows] = values
                sink.bar.update(len(rows))
            sink.add([item.key for item in group], out.numpy(), tick=False)
