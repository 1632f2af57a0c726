"""The output file of ``tome embed``: one parquet file, written in parts that are whole or absent,
resumable (:class:`Store`), and read back with :func:`read_embeddings`.

The file has one row per item: ``path`` (images) or ``id`` (texts), and ``embedding`` (a list of
float32). Its schema metadata (key ``tome``) records the model, the merge setting and the options
that made it, so that a rerun can tell whether it may add to it. Needs pyarrow (imported on use).

>>> import tempfile
>>> from pathlib import Path
>>> out = Path(tempfile.mkdtemp()) / "rows.parquet"
>>> store = Store(out, {"format": FORMAT, "kind": "text"})
>>> store.check(); store.open()
set()
>>> _ = store.write(["a.txt:1", "a.txt:2"], [[1.0, 2.0], [3.0, 4.0]])
>>> store.finish()
2
>>> read_embeddings(out)[:2]
(['a.txt:1', 'a.txt:2'], [[1.0, 2.0], [3.0, 4.0]])
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from tome.tools.errors import UserError

__all__ = ["FORMAT", "IDENTITY", "META_KEY", "Store", "check_before_load", "check_out", "read_embeddings"]

FORMAT = "tome-embed/1"
META_KEY = b"tome"
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
_PART = re.compile(r"part-(\d{6})\.parquet")


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


def _difference(old: dict, new: dict, *, partial: bool = False) -> str | None:
    """What differs between two metadata, in :data:`IDENTITY` order. ``partial``: ``new`` holds
    only what is known before the model loads; its keys alone are compared, and of its
    ``options`` (the ones given) only those ``old`` records."""
    for key in IDENTITY:
        if partial and key not in new:
            continue
        if partial and key == "options":
            recorded = old.get("options") or {}
            for name, value in new["options"].items():
                if name in recorded and recorded[name] != value:
                    return f"{name} {recorded[name]!r}, this run {value!r}"
        elif old.get(key) != new.get(key):
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

    def check(self, *, partial: bool = False) -> None:
        """:class:`UserError` when ``out`` (or its parts) holds rows another model or setting
        made, or is not a file ``tome embed`` wrote. ``partial``: the store's metadata holds only
        what is known before the model loads (see :func:`check_before_load`)."""
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
            diff = _difference(meta, self.meta, partial=partial)
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


def check_before_load(out: Path, known: dict) -> None:
    """:meth:`Store.check` with what is known of this run's metadata before its model loads
    (``known``: some of :data:`IDENTITY`, ``kind`` among them; ``options``: the ones given), so that
    a rerun with another setting is refused before a model that may take a minute to load;
    :meth:`Store.check` compares the whole metadata after.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "rows.parquet"
    >>> meta = {"format": FORMAT, "kind": "text", "setting": "ratio=0.1", "options": {"mode": "mean"}}
    >>> store = Store(out, meta)
    >>> store.check(); _ = store.open(); _ = store.write(["a.txt:1"], [[1.0]]); _ = store.finish()
    >>> check_before_load(out, {"format": FORMAT, "kind": "text", "setting": "ratio=0.1", "options": {}})
    >>> check_before_load(out, {**meta, "setting": "ratio=0.2"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    tome.tools.errors.UserError: --out ...: its rows were made with another setting 'ratio=0.1', this run 'ratio=0.2'; ...
    >>> check_before_load(out, {**meta, "options": {"mode": "mlerp"}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    tome.tools.errors.UserError: --out ...: its rows were made with another mode 'mean', this run 'mlerp'; ...
    """
    Store(out, known).check(partial=True)


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
