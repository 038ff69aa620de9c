"""Where clickloop keeps files: a local folder or any `pyarrow.fs` URI (pure naming + opening).

The archive (`CLICKLOOP_ARCHIVE_URI`) and the model artifacts
(`CLICKLOOP_MODEL_DIR`) both live under one: a folder (the default, under
the state dir), `s3://bucket/prefix`, `gs://…`, `hdfs://namenode/path`, or
`file:///…`. A `Location` is one place under such a root: its filesystem, its
path on that filesystem, and its URI (the query string of the root, such as
`?endpoint_override=…&region=…`, carried along so that a location handed to
another process opens the same store). Credentials are never part of it: S3,
GCS and HDFS clients read them from their usual environment.

What "durable, then visible" takes differs by kind (`local`, `atomic_put`),
and each writer decides with them (streams/archive_store.py,
services/model/artifact.py):
- local: write under a temporary name, `fsync`, rename (atomic on POSIX),
  `fsync` the directory (`fsync_dir`);
- object stores (S3, GCS, Azure): an object appears whole when its upload
  completes, and there is no rename: write to the final key;
- others (HDFS): temporary name, close, rename (the NameNode makes it atomic).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

_ATOMIC_PUT = tuple(getattr(pafs, n) for n in ("S3FileSystem", "GcsFileSystem", "AzureFileSystem")
                    if hasattr(pafs, n))


@dataclass(frozen=True)
class Location:
    """A place in a store: `fs` and `path` to act on it, `uri` to name it to others."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def atomic_put(self) -> bool:
        return isinstance(self.fs, _ATOMIC_PUT)

    def child(self, *parts: str) -> "Location":
        """The location `parts` below this one (same filesystem, same URI query)."""
        tail = "/".join(parts)
        base, sep, query = self.uri.partition("?")
        return Location(self.fs, f"{self.path.rstrip('/')}/{tail}",
                        f"{base.rstrip('/')}/{tail}{sep}{query}")

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def __str__(self) -> str:
        return self.uri


def locate(where: str | Path) -> Location:
    """Open a folder path or a filesystem URI. A local path is made absolute, so the
    location means the same to a process started elsewhere (ValueError/OSError when
    pyarrow cannot open the URI: an unknown scheme, a filesystem not built in)."""
    where = str(where)
    if "://" not in where:
        path = str(Path(where).resolve())
        return Location(pafs.LocalFileSystem(), path, path)
    fs, path = pafs.FileSystem.from_uri(where)
    path = path.rstrip("/") or "/"
    if isinstance(fs, pafs.LocalFileSystem):   # file:///… names the folder like a path
        return Location(fs, path, path)
    return Location(fs, path, where)


def fsync_dir(path: str) -> None:
    """Make a local directory's entries (a rename, a new file) survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
