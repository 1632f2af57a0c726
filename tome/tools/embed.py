"""``tome embed``: one embedding per image (or per line of a text file) of a whole collection,
into one parquet file, resumable; on Ray Data when one machine is not enough
(:mod:`tome.tools.embed_ray`).

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

import json
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from tome.tools.errors import UserError

if TYPE_CHECKING:
    import torch

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

FORMAT = "tome-embed/1"
META_KEY = b"tome"
# The exit status of a job that finished but skipped items (2 is for bad input, nothing written).
EXIT_SKIPPED = 3
# What must be equal for a rerun to add rows to a file: what changes the embeddings.
IDENTITY = (
    "format",
    "kind",
    "model",
    "weights",
    "random_init",
    "img_size",
    "max_tokens",
    "setting",
    "options",
)
TEXT_SUFFIXES = (".txt", ".text")
_PART = re.compile(r"part-(\d{6})\.parquet")


@dataclass(frozen=True)
class Item:
    """One row to embed: ``key`` (the row's ``path`` or ``id``), the file to read, and for texts
    the text."""

    key: str
    path: str
    text: str | None = None


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
            f"({self.items_per_s:.1f}/s; {self.load_s:.1f}s of it loading the model; {self.runner}), "
            f"{self.already} already there, "
            f"{len(self.skipped)} skipped"
        )
        if self.model_s > 0:
            line += (
                f"; decoding {self.decode_s:.1f}s, model {self.model_s:.1f}s: decoding is "
                f"{100 * self.decode_share:.0f}% of the work"
            )
        return line


# -- inputs ------------------------------------------------------------------------------------


def image_items(inputs: Iterable[str | Path]) -> list[Item]:
    """Every image under ``inputs`` (files, and folders searched recursively), each once, keyed
    by its absolute path. :class:`UserError` for a missing path or a folder with no images."""
    from tome.tools.images import find_images

    paths, problems = find_images(inputs)
    if problems:
        raise UserError(problems[0])
    items: dict[str, Item] = {}
    for path in paths:
        key = os.path.abspath(path)
        items.setdefault(key, Item(key, key))
    if not items:
        raise UserError("no images found")
    return list(items.values())


def text_items(inputs: Iterable[str | Path]) -> list[Item]:
    """One item per non-empty line of the UTF-8 text files ``inputs``, keyed
    ``ABSOLUTE_PATH:LINE`` (lines counted from 1). :class:`UserError` for a missing file, a
    folder, a file that is not UTF-8 or has no text."""
    items: dict[str, Item] = {}
    for given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            raise UserError(f"{path}: no such file")
        if path.is_dir():
            raise UserError(f"{path}: a folder; texts come from text files (one text a line)")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        except OSError as error:
            raise UserError(f"{path}: cannot read it: {error.strerror or error}") from None
        absolute = os.path.abspath(path)
        found = 0
        for number, line in enumerate(lines, 1):
            if line.strip():
                key = f"{absolute}:{number}"
                items.setdefault(key, Item(key, absolute, line.strip()))
                found += 1
        if not found:
            raise UserError(f"{path}: no texts in it (empty lines are skipped)")
    if not items:
        raise UserError("no text files given")
    return list(items.values())


def _is_text_job(inputs: Sequence[str | Path], model: str | None, texts: bool | None) -> bool:
    """Texts when asked (``texts``), when the model is a ``text:`` spec, or when no model is
    given and every input is a ``.txt`` file."""
    from tome.tools.text import is_text_spec

    if texts is not None:
        return bool(texts)
    if model is not None:
        return is_text_spec(model)
    return bool(inputs) and all(Path(p).suffix.lower() in TEXT_SUFFIXES and Path(p).is_file() for p in inputs)


# -- settings ----------------------------------------------------------------------------------


def resolve_setting(r=None, ratio=None, *, text: bool = False):
    """The one setting a job runs: an ``r`` schedule (int, ``(r, inflection)``, per-layer list,
    or text as ``--r`` writes it: ``"16:-0.75"``), a :class:`~tome.tools.schedule_text.Ratio`,
    or ``0`` (unmerged). Default: ``r=16`` for images, ``ratio=0.1`` for texts.

    >>> resolve_setting("16:-0.75"), resolve_setting(ratio=0.2), resolve_setting(text=True)
    ((16, -0.75), Ratio(value=0.2), Ratio(value=0.1))
    """
    from tome.schedule import check_schedule
    from tome.tools.schedule_text import Ratio, parse_r, parse_ratio

    if r is not None and ratio is not None:
        raise UserError("--r and --ratio: give one of them")
    if ratio is not None:
        values = parse_ratio(str(ratio))
        if len(values) != 1:
            raise UserError(f"--ratio: expected one fraction, got {len(values)}")
        return values[0]
    if r is None:
        return Ratio(0.1) if text else 16
    if isinstance(r, str):
        values = parse_r(r)
        if len(values) != 1:
            raise UserError(f"--r: expected one schedule, got {len(values)}")
        return values[0]
    try:
        check_schedule(r)
    except (TypeError, ValueError) as error:
        raise UserError(f"--r: {error}") from None
    return tuple(r) if isinstance(r, tuple) else r


# -- the output file ---------------------------------------------------------------------------


def _key_column(kind: str) -> str:
    return "path" if kind == "image" else "id"


def _schema(meta: dict):
    import pyarrow as pa

    return pa.schema(
        [(_key_column(meta["kind"]), pa.string()), ("embedding", pa.list_(pa.float32()))],
        metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()},
    )


def _table(keys: Sequence[str], embeddings, schema):
    import numpy as np
    import pyarrow as pa

    values = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = values.shape
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    lists = pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), pa.float32()))
    return pa.Table.from_arrays([pa.array(list(keys), pa.string()), lists], schema=schema)


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _metadata_of(path: Path) -> dict | None:
    """The ``tome`` metadata of a parquet file, or None when it is not a readable tome file."""
    import pyarrow.parquet as pq

    try:
        found = pq.read_schema(path).metadata or {}
        return json.loads(found[META_KEY])
    except Exception:  # any unreadable or foreign file: the caller decides
        return None


def _difference(old: dict, new: dict) -> str | None:
    for key in IDENTITY:
        if old.get(key) != new.get(key):
            return f"{key} {old.get(key)!r}, this run {new.get(key)!r}"
    return None


def read_embeddings(path: str | Path) -> tuple[list[str], list[list[float]], dict]:
    """The keys, embeddings and ``tome`` metadata of a file ``tome embed`` wrote.

    (For large files read it with pyarrow or pandas directly: ``pq.read_table(path)``.)
    """
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {})[META_KEY])
    return table.column(0).to_pylist(), table.column("embedding").to_pylist(), meta


class Store:
    """The rows of one output file: what is written, chunk by chunk, and the final file.

    ``check()`` reads only (it refuses a file of another job); ``open()`` makes the parts folder
    and returns the keys already written; ``write()`` adds a part atomically; ``finish()`` makes
    ``out`` whole."""

    def __init__(self, out: Path, meta: dict, log: Callable[[str], None] | None = None) -> None:
        self.out = out
        self.meta = meta
        self.key = _key_column(meta["kind"])
        self.parts = out.with_name(out.name + ".parts")
        self.skipped_file = out.with_name(out.name + ".skipped.tsv")
        self.log = log or (lambda line: None)
        self._next = 0

    def check(self) -> None:
        """:class:`UserError` when ``out`` (or its parts) holds rows another model or setting
        made, or is not a file ``tome embed`` wrote."""
        if self.out.is_dir():
            raise UserError(f"--out {self.out}: a folder; expected a .parquet file name")
        found: list[tuple[str, dict | None]] = []
        if self.out.exists():
            found.append((str(self.out), _metadata_of(self.out)))
        meta_file = self.parts / "meta.json"
        if meta_file.is_file():
            try:
                found.append((str(meta_file), json.loads(meta_file.read_text())))
            except (OSError, ValueError):
                found.append((str(meta_file), None))
        for where, meta in found:
            if meta is None or meta.get("format") != FORMAT:
                raise UserError(
                    f"--out {self.out}: {where} exists and is not a file tome embed wrote; "
                    "give another --out (it is not overwritten)"
                )
            diff = _difference(meta, self.meta)
            if diff is not None:
                raise UserError(
                    f"--out {self.out}: its rows were made with another {diff}; resuming would mix "
                    "embeddings: give another --out, or the same model and settings"
                )

    def _part_files(self) -> list[Path]:
        if not self.parts.is_dir():
            return []
        return sorted(p for p in self.parts.iterdir() if _PART.fullmatch(p.name))

    def _keys_of(self, path: Path) -> list[str]:
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=[self.key]).column(0).to_pylist()

    def open(self) -> set[str]:
        """Make the parts folder; drop leftover temporary files and parts that cannot be read
        (a write cut short); return the keys already written (in ``out`` and in the parts)."""
        done: set[str] = set()
        if self.out.exists():
            done.update(self._keys_of(self.out))
        self.parts.mkdir(exist_ok=True)
        meta_file = self.parts / "meta.json"
        if not meta_file.is_file():
            tmp = self.parts / ".meta.json.tmp"
            tmp.write_text(json.dumps(self.meta, sort_keys=True))
            os.replace(tmp, meta_file)
        for leftover in self.parts.glob(".*.tmp"):
            leftover.unlink()
        for part in self._part_files():
            self._next = max(self._next, int(_PART.fullmatch(part.name).group(1)) + 1)
            try:
                meta = _metadata_of(part)
                if meta is None or _difference(meta, self.meta) is not None:
                    raise ValueError("not a part of this job")
                done.update(self._keys_of(part))
            except Exception as error:  # a broken part: its rows are done again
                self.log(f"{part.name}: cannot read it ({type(error).__name__}); its rows are embedded again")
                part.unlink()
        return done

    def write(self, keys: Sequence[str], embeddings) -> Path:
        """Write one part: a temporary file, flushed to disk, renamed into place."""
        import pyarrow.parquet as pq

        part = self.parts / f"part-{self._next:06d}.parquet"
        tmp = self.parts / f".{part.name}.tmp"
        self._next += 1
        pq.write_table(_table(keys, embeddings, _schema(self.meta)), tmp)
        _fsync(tmp)
        os.replace(tmp, part)
        return part

    def finish(self) -> int:
        """Write ``out`` with its earlier rows and every part's (each key once), then drop the
        parts; return the number of rows."""
        import pyarrow.parquet as pq

        parts = self._part_files()
        if not parts:
            shutil.rmtree(self.parts, ignore_errors=True)
            return pq.ParquetFile(self.out).metadata.num_rows if self.out.exists() else 0
        sources = ([self.out] if self.out.exists() else []) + parts
        meta = {**self.meta, "tome_version": _version()}
        schema = _schema(meta)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        seen: set[str] = set()
        rows = 0
        with pq.ParquetWriter(tmp, schema) as writer:
            for source in sources:
                for batch in pq.ParquetFile(source).iter_batches(batch_size=4096):
                    keep = []
                    for key in batch.column(0).to_pylist():
                        keep.append(key not in seen)
                        seen.add(key)
                    kept = batch if all(keep) else batch.filter(keep)
                    if kept.num_rows:
                        writer.write_batch(kept)
                        rows += kept.num_rows
        _fsync(tmp)
        os.replace(tmp, self.out)
        shutil.rmtree(self.parts)
        return rows

    def write_skipped(self, skipped: Sequence[tuple[str, str]]) -> Path | None:
        """``OUT.skipped.tsv`` (key, reason) for this run's skipped items; removed when none."""
        if not skipped:
            self.skipped_file.unlink(missing_ok=True)
            return None
        tmp = self.skipped_file.with_name(f".{self.skipped_file.name}.tmp")
        lines = [f"{self.key}\treason"] + [f"{k}\t{' '.join(r.split())}" for k, r in skipped]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, self.skipped_file)
        return self.skipped_file


def _version() -> str:
    from tome import __version__

    return __version__


def check_out(out: str | Path) -> Path:
    """``out`` as a path whose folder exists (made if needed) and can be written; nothing else is
    written. :class:`UserError` otherwise."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise UserError(f"--out {path}: a folder; expected a .parquet file name")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".tome-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--out {path}: cannot write to {folder}: {error.strerror or error}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"--out {path}: not writable")
    return path


# -- running -----------------------------------------------------------------------------------


@dataclass
class Stats:
    """Counters shared by the local and the Ray runner."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    embedded: int = 0
    decode_s: float = 0.0
    model_s: float = 0.0
    wait_s: float = 0.0


class Sink:
    """Collects finished rows and writes them in parts of ``chunk`` rows, in the order given."""

    def __init__(self, store: Store, chunk: int, stats: Stats, bar, on_chunk: Callable[[int], None] | None):
        self.store, self.chunk, self.stats, self.bar, self.on_chunk = store, chunk, stats, bar, on_chunk
        self.keys: list[str] = []
        self.rows: list = []

    def add(self, keys: Sequence[str], embeddings, *, tick: bool = True) -> None:
        """Rows ``keys`` with ``embeddings`` (n, D) float32; parts are written as they fill."""
        self.keys.extend(keys)
        self.rows.extend(embeddings)
        if tick:
            self.bar.update(len(keys))
        while len(self.keys) >= self.chunk:
            self._flush(self.chunk)

    def skip(self, key: str, reason: str) -> None:
        self.stats.skipped.append((key, reason))
        self.bar.update(1)

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


def decode_image(path: str, size: int, crop_pct: float | None):
    """``(pixels, None)``: the image as the model sees it, a (3, size, size) uint8 numpy array,
    resized as :meth:`tome.tools.model.Model.to_unit` resizes it (which gives these / 255); or
    ``(None, reason)`` when it cannot be read. Needs PIL and numpy only."""
    from PIL import Image

    from tome.tools.images import resized

    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except Exception as error:  # a corrupt file may raise anything from PIL's decoders
        message = (str(error).splitlines() or [""])[0][:200]
        return None, f"cannot read it as an image ({type(error).__name__}: {message})"
    # uint8 until the model's side: 4x less to hold (or to send to a Ray actor)
    return resized(rgb, size, crop_pct).transpose(2, 0, 1), None


def pixels_for(model, uint8) -> torch.Tensor:
    """(B, 3, S, S) uint8 numpy array -> the model's normalised float32 input, bit for bit what
    ``model.preprocess`` gives."""
    import numpy as np
    import torch

    from tome.tools.images import normalize

    unit = torch.from_numpy(np.ascontiguousarray(uint8)).float().div_(255)
    return normalize(unit, model.mean, model.std)


def _run_images(model, items: Sequence[Item], sink: Sink, stats: Stats, *, batch: int, workers: int) -> None:
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


def _run_texts(model, items: Sequence[Item], sink: Sink, stats: Stats, *, batch: int, chunk: int) -> None:
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


# -- the job -----------------------------------------------------------------------------------


def _load(
    kind: str,
    spec: str | None,
    setting,
    options: dict,
    *,
    weights,
    random_init: bool,
    img_size: int | None,
    max_tokens: int | None,
    log: Callable[[str], None],
):
    """The model, patched with ``setting``, and the metadata that names what it computes."""
    import torch

    from tome.tools.schedule_text import setting_label

    if kind == "text":
        from tome.tools.text import DEFAULT_TEXT_MODEL, check_text_spec, load_text_model

        spec = spec or DEFAULT_TEXT_MODEL
        check_text_spec(spec)
        for flag, value in {"weights": weights, "random_init": random_init, "img_size": img_size}.items():
            if value not in (None, False):
                raise UserError(f"--{flag.replace('_', '-')}: for image models; {spec} is a text model")
        model = load_text_model(spec, log=log)
        if max_tokens is not None:
            if not 2 <= max_tokens <= model.limit:
                raise UserError(f"--max-tokens {max_tokens}: {model.name} takes 2 to {model.limit} tokens")
            model.max_tokens = max_tokens
        model.set_setting(None if setting == 0 else setting, **options)
        extra = {"max_tokens": model.max_tokens, "img_size": None, "weights": None, "random_init": False}
    else:
        from tome.tools.loading import DEFAULT_MODEL, load_model
        from tome.tools.text import is_text_spec

        spec = spec or DEFAULT_MODEL
        if is_text_spec(spec):
            raise UserError(f"--model {spec}: a text model needs text files (one text a line), not images")
        if max_tokens is not None:
            raise UserError("--max-tokens: for text models only")
        if random_init:
            torch.manual_seed(0)  # the same random weights in every run: a resume must match
        model = load_model(spec, weights=weights, random_init=random_init, img_size=img_size, log=log)
        for note in model.notes:
            log(f"tome: warning: {model.name}: {note}")
        model.set_r(None if setting == 0 else setting, **options)
        extra = {
            "img_size": model.img_size,
            "max_tokens": None,
            "weights": os.path.abspath(weights) if weights else None,
            "random_init": bool(random_init),
        }
    meta = {
        "format": FORMAT,
        "kind": kind,
        "model": model.name,
        "setting": setting_label(setting),
        "options": _effective_options(
            model.handle() if kind == "text" else model.module.__dict__.get("tome")
        ),
        **extra,
    }
    return model, meta


def _effective_options(handle) -> dict:
    """The options the patched model merges with, defaults included (so that a rerun under a tome
    whose defaults changed is refused, not mixed in); none when unpatched."""
    if handle is None or not hasattr(handle, "patch_options"):
        return {}
    found = {k: v for k, v in handle.patch_options().items() if k not in ("r", "ratio")}
    return json.loads(json.dumps(dict(sorted(found.items())), default=str))


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
        workers: decoding threads (default: ``min(4, cpu count)``); threads: torch's.
        ray, ray_address, ray_actors: run on Ray Data (:mod:`tome.tools.embed_ray`): a local
            Ray started for the job, or the cluster at ``ray_address``; ``ray_actors`` model
            copies (default: one per node).
        on_chunk: called with the rows embedded so far after each part is written.
        options: :func:`tome.patch` options (``mode``, ``metric``, ...).

    The example at the top of :mod:`tome.tools.embed` runs it.
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
    kind = "text" if _is_text_job(inputs, model, texts) else "image"
    setting = resolve_setting(r, ratio, text=kind == "text")
    items = text_items(inputs) if kind == "text" else image_items(inputs)
    path = check_out(out)
    if importlib_missing("pyarrow"):
        raise UserError("tome embed writes parquet: pip install pyarrow (or 'tome-merging[ray]')")
    if (ray or ray_address) and importlib_missing("ray"):
        raise UserError("--ray needs Ray Data: pip install 'tome-merging[ray]'")
    if threads is not None:
        torch.set_num_threads(threads)
    load_start = time.perf_counter()
    load = partial(
        _load,
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
    try:
        if use_ray:
            from tome.tools.embed_ray import run_ray, start_ray

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
        sink = Sink(store, chunk, stats, bar, on_chunk)
        runner = "local"
        try:
            if pending and use_ray:
                runner = run_ray(
                    loaded, kind, pending, sink, stats, batch=batch, actors=ray_actors, threads=threads,
                    log=say,
                )  # fmt: skip
            elif pending and kind == "image":
                workers = workers or min(4, os.cpu_count() or 1)
                _run_images(loaded, pending, sink, stats, batch=batch, workers=workers)
            elif pending:
                _run_texts(loaded, pending, sink, stats, batch=batch, chunk=chunk)
            sink.close()
        finally:
            bar.close()
    finally:
        if ray_started:
            from tome.tools.embed_ray import stop_ray

            stop_ray()
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
    )


def importlib_missing(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is None
