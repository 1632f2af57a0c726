"""The output file of ``tome embed``: one parquet file, written in parts that are whole or absent,
resumable (:class:`Store`), and read back with :func:`read_embeddings`.

The file has one row per item: ``path`` (images) or ``id`` (texts), and ``embedding`` (a list of
float32). Its schema metadata (key ``tome``) records the model, the merge setting and the options
that made it, so that a rerun can tell whether it may add to it. Needs pyarrow (imported on use).
``out`` is a local path or a ``pyarrow.fs`` URI (:mod:`tome.tools.embed.place`); the parts are
written by :func:`write_part`, here or on a Ray worker, whole or absent.

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

import io
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from tome.tools.embed import place
from tome.tools.errors import UserError

__all__ = [
    "FORMAT",
    "IDENTITY",
    "META_KEY",
    "Store",
    "check_before_load",
    "check_out",
    "part_name",
    "read_embeddings",
    "write_part",
]

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


def part_name(number: int) -> str:
    """The file name of part ``number``.

    >>> part_name(7)
    'part-000007.parquet'
    """
    return f"part-{number:06d}.parquet"


def write_part(fs, parts: str, number: int, keys: Sequence[str], embeddings, meta: dict, local: bool) -> str:
    """Write part ``number`` of the parts folder ``parts`` (on ``fs``): whole or absent
    (:func:`~tome.tools.embed.place.write_whole`); returns its path. Whoever writes it (the local
    job, or a Ray worker) writes the same bytes for the same rows."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(_table(keys, embeddings, _schema(meta)), buffer)
    path = f"{parts}/{part_name(number)}"
    place.write_whole(fs, path, buffer.getvalue(), local)
    return path


def _metadata_of(fs, path: str) -> dict | None:
    """The ``tome`` metadata of a parquet file, or None when it is not a readable tome file."""
    import pyarrow.parquet as pq

    try:
        found = pq.read_schema(path, filesystem=fs).metadata or {}
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
    """The keys, embeddings and ``tome`` metadata of a file ``tome embed`` wrote (a path or a
    ``pyarrow.fs`` URI).

    (For large files read it with pyarrow or pandas directly: ``pq.read_table(path)``.)
    """
    import pyarrow.parquet as pq

    table = pq.read_table(path if place.is_uri(path) else str(path))
    meta = json.loads((table.schema.metadata or {})[META_KEY])
    return table.column(0).to_pylist(), table.column("embedding").to_pylist(), meta


class Store:
    """The rows of one output file: what is written, chunk by chunk, and the final file.

    ``check()`` reads only (it refuses a file of another job); ``open()`` makes the parts folder
    and returns the keys already written; ``write()`` adds a part atomically; ``finish()`` makes
    ``out`` whole. ``out``: a local path or a ``pyarrow.fs`` URI."""

    def __init__(self, out: Path | str, meta: dict, log: Callable[[str], None] | None = None) -> None:
        self.out = out
        self.meta = meta
        self.key = _key_column(meta["kind"])
        self.fs, self.path, self.local = place.resolve(out)
        self.parts = self.path + ".parts"
        self.skipped_path = self.path + ".skipped.tsv"
        self.log = log or (lambda line: None)
        self._next = 0

    @property
    def skipped_file(self) -> Path | str:
        """``OUT.skipped.tsv``, as ``out`` was given (a path or a URI)."""
        return Path(self.skipped_path) if not place.is_uri(self.out) else f"{self.out}.skipped.tsv"

    @property
    def next_part(self) -> int:
        """The number of the next part to write (after every part found by :meth:`open`)."""
        return self._next

    def check(self, *, partial: bool = False) -> None:
        """:class:`UserError` when ``out`` (or its parts) holds rows another model or setting
        made, or is not a file ``tome embed`` wrote. ``partial``: the store's metadata holds only
        what is known before the model loads (see :func:`check_before_load`)."""
        if place.is_dir(self.fs, self.path):
            raise UserError(f"--out {self.out}: a folder; expected a .parquet file name")
        found: list[tuple[str, dict | None]] = []
        if place.exists(self.fs, self.path):
            found.append((str(self.out), _metadata_of(self.fs, self.path)))
        meta_file = f"{self.parts}/meta.json"
        if place.exists(self.fs, meta_file):
            try:
                with self.fs.open_input_stream(meta_file) as stream:
                    found.append((meta_file, json.loads(stream.read())))
            except (OSError, ValueError):
                found.append((meta_file, None))
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

    def part_files(self) -> list[str]:
        """The paths of the parts written, in part order."""
        return [
            f"{self.parts}/{name}" for name in place.listdir(self.fs, self.parts) if _PART.fullmatch(name)
        ]

    def _keys_of(self, path: str) -> list[str]:
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=[self.key], filesystem=self.fs).column(0).to_pylist()

    def open(self) -> set[str]:
        """Make the parts folder; drop leftover temporary files and parts that cannot be read
        (a write cut short); return the keys already written (in ``out`` and in the parts)."""
        done: set[str] = set()
        if place.exists(self.fs, self.path):
            done.update(self._keys_of(self.path))
        self.fs.create_dir(self.parts, recursive=True)
        meta_file = f"{self.parts}/meta.json"
        if not place.exists(self.fs, meta_file):
            place.write_whole(self.fs, meta_file, json.dumps(self.meta, sort_keys=True).encode(), self.local)
        for name in place.listdir(self.fs, self.parts):
            if name.startswith(".") and name.endswith(".tmp"):
                place.remove(self.fs, f"{self.parts}/{name}")
        for part in self.part_files():
            name = part.rsplit("/", 1)[1]
            self._next = max(self._next, int(_PART.fullmatch(name).group(1)) + 1)
            try:
                meta = _metadata_of(self.fs, part)
                if meta is None or _difference(meta, self.meta) is not None:
                    raise ValueError("not a part of this job")
                done.update(self._keys_of(part))
            except Exception as error:  # a broken part: its rows are done again
                self.log(f"{name}: cannot read it ({type(error).__name__}); its rows are embedded again")
                place.remove(self.fs, part)
        return done

    def write(self, keys: Sequence[str], embeddings) -> str:
        """Write the next part (whole or absent); returns its path."""
        self._next += 1
        return write_part(self.fs, self.parts, self._next - 1, keys, embeddings, self.meta, self.local)

    def finish(self, order: Sequence[str] | None = None) -> int:
        """Write ``out`` with its earlier rows and every part's (each key once), then drop the
        parts; return the number of rows. ``order``: the keys in input order; the rows follow it
        (rows of keys not in it, from an earlier run, first), else ``out``'s then the parts'."""
        import pyarrow.parquet as pq

        parts = self.part_files()
        if not parts:
            place.remove(self.fs, self.parts)
            if place.exists(self.fs, self.path):
                return pq.ParquetFile(self.path, filesystem=self.fs).metadata.num_rows
            return 0
        sources = ([self.path] if place.exists(self.fs, self.path) else []) + parts
        meta = {**self.meta, "tome_version": _version()}
        tmp = place.temporary_name(self.path)
        if order is None:
            rows = self._stream(sources, tmp, _schema(meta))
        else:
            rows = self._in_order(sources, tmp, _schema(meta), {key: i for i, key in enumerate(order)})
        if self.local:
            with open(tmp, "rb") as file:
                os.fsync(file.fileno())
        self.fs.move(tmp, self.path)  # local: an atomic rename; object stores: a server-side copy
        place.remove(self.fs, self.parts)
        return rows

    def _stream(self, sources: Sequence[str], tmp: str, schema) -> int:
        """``sources`` into ``tmp``, a batch at a time, each key once (the first one)."""
        import pyarrow.parquet as pq

        seen: set[str] = set()
        rows = 0
        with self.fs.open_output_stream(tmp) as stream, pq.ParquetWriter(stream, schema) as writer:
            for source in sources:
                for batch in pq.ParquetFile(source, filesystem=self.fs).iter_batches(batch_size=4096):
                    keep = []
                    for key in batch.column(0).to_pylist():
                        keep.append(key not in seen)
                        seen.add(key)
                    kept = batch if all(keep) else batch.filter(keep)
                    if kept.num_rows:
                        writer.write_batch(kept)
                        rows += kept.num_rows
        return rows

    def _in_order(self, sources: Sequence[str], tmp: str, schema, position: dict[str, int]) -> int:
        """``sources`` into ``tmp`` in input order. When the sources, taken by their first row's
        position, already give that order (the parts of one run, or of runs that each did a
        range), they are streamed; else (parts of runs that crossed) the rows are sorted in
        memory."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = {source: self._keys_of(source) for source in sources}

        def first(source: str) -> int:
            return min((position.get(k, -1) for k in keys[source]), default=-1)

        ordered = sorted(sources, key=lambda s: (first(s), sources.index(s)))
        seen: set[str] = set()
        last = -2
        streamable = True
        for source in ordered:
            for key in keys[source]:
                if key in seen:
                    continue
                seen.add(key)
                at = position.get(key, -1)
                if at < last:
                    streamable = False
                last = at
        if streamable:
            return self._stream(ordered, tmp, schema)
        table = pa.concat_tables(
            pq.read_table(s, filesystem=self.fs).replace_schema_metadata(schema.metadata) for s in sources
        )
        column = table.column(0).to_pylist()
        seen.clear()
        keep, at = [], []
        for i, key in enumerate(column):
            if key not in seen:
                seen.add(key)
                keep.append(i)
                at.append(position.get(key, -1))
        take = np.asarray(keep)[np.argsort(np.asarray(at), kind="stable")]
        with self.fs.open_output_stream(tmp) as stream:
            pq.write_table(table.take(pa.array(take)).cast(schema), stream)
        return len(take)

    def write_skipped(self, skipped: Sequence[tuple[str, str]]) -> Path | str | None:
        """``OUT.skipped.tsv`` (key, reason) for this run's skipped items; removed when none."""
        if not skipped:
            place.remove(self.fs, self.skipped_path)
            return None
        lines = [f"{self.key}\treason"] + [f"{k}\t{' '.join(r.split())}" for k, r in skipped]
        place.write_whole(self.fs, self.skipped_path, ("\n".join(lines) + "\n").encode(), self.local)
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


def check_out(out: str | Path) -> Path | str:
    """``out`` as a path whose folder exists (made if needed) and can be written (or, for a
    ``pyarrow.fs`` URI, the URI, its folder made and written to); nothing else is written.
    :class:`UserError` otherwise."""
    if place.is_uri(out):
        return _check_uri(out)
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


def _check_uri(out: str) -> str:
    try:
        fs, path, local = place.resolve(out)
    except Exception as error:  # pyarrow: ValueError / ArrowInvalid / OSError for a bad URI
        raise UserError(f"--out {out}: not a file system URI pyarrow knows ({error})") from None
    if place.is_dir(fs, path):
        raise UserError(f"--out {out}: a folder; expected a .parquet file name")
    folder = path.rsplit("/", 1)[0]
    probe = f"{folder}/.tome-write-test-{os.getpid()}"
    try:
        fs.create_dir(folder, recursive=True)
        place.write_whole(fs, probe, b"", local)
        fs.delete_file(probe)
    except Exception as error:  # OSError, or pyarrow's errors from an object store
        raise UserError(f"--out {out}: cannot write to {folder}: {error}") from None
    return out
