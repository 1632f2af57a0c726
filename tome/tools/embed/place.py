"""Where ``tome embed`` writes: a local path or any location a ``pyarrow.fs`` filesystem URI
names (``file:///shared/photos.parquet``, ``s3://bucket/photos.parquet``, ``gs://...``), and
the one way it writes a file there: whole or absent (:func:`write_whole`).

On a local (or network-mounted) file system a file is written to a hidden temporary name,
flushed to disk and renamed into place (a rename is atomic). On an object store an object is
only visible once its upload completes, so it is written in one piece to its own name (a worker
killed in the middle leaves nothing); a part is small (its rows are held in memory first).

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> fs, path, local = resolve(f"file://{folder}/rows.parquet")
>>> local, path == f"{folder}/rows.parquet"
(True, True)
>>> write_whole(fs, f"{folder}/a.txt", b"abc", local); exists(fs, f"{folder}/a.txt")
True
>>> [name for name in listdir(fs, folder)]
['a.txt']
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["exists", "is_dir", "is_uri", "listdir", "remove", "resolve", "write_whole"]


def is_uri(out) -> bool:
    """``out`` names a filesystem URI (``SCHEME://...``) rather than a local path."""
    return isinstance(out, str) and "://" in out


def resolve(out):
    """``(filesystem, path in it, local)`` for a local path or a ``pyarrow.fs`` URI; ``local``:
    the file system renames atomically (local disks, NFS and other POSIX mounts)."""
    import pyarrow.fs as pafs

    if is_uri(out):
        fs, path = pafs.FileSystem.from_uri(out)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(Path(out).expanduser())
    return fs, path, isinstance(fs, pafs.LocalFileSystem)


def _type(fs, path: str):
    return fs.get_file_info(path).type


def exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return _type(fs, path) != pafs.FileType.NotFound


def is_dir(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return _type(fs, path) == pafs.FileType.Directory


def listdir(fs, folder: str) -> list[str]:
    """The names of the files in ``folder`` (none when it is missing)."""
    import pyarrow.fs as pafs

    if not is_dir(fs, folder):
        return []
    found = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(info.base_name for info in found if info.type == pafs.FileType.File)


def remove(fs, path: str) -> None:
    """Delete a file, or a folder and what it holds; nothing when it is missing."""
    import pyarrow.fs as pafs

    kind = _type(fs, path)
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind != pafs.FileType.NotFound:
        fs.delete_file(path)


def temporary_name(path: str) -> str:
    """A hidden name beside ``path``, unique to this write (``.NAME.ID.tmp``): two writers of the
    same file (a retried task and the one it replaced) never share one."""
    folder, name = path.rsplit("/", 1) if "/" in path else ("", path)
    return f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.tmp"


def write_whole(fs, path: str, data: bytes, local: bool) -> None:
    """Write ``data`` to ``path`` so that ``path`` is whole or absent, whatever stops the write."""
    if not local:
        with fs.open_output_stream(path) as stream:  # an object appears when its upload completes
            stream.write(data)
        return
    tmp = temporary_name(path)
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
