"""The archive's filesystem: write, make durable, publish, list, delete (pyarrow.fs).

The store under a URI (streams/storage.py): a local folder (the default,
`<state_dir>/archive`), `s3://bucket/prefix`, `hdfs://namenode/path`, `gs://...` —
whatever `pyarrow.fs.FileSystem.from_uri` opens. What "durable, then visible"
means on each:

- local: the file is written under a temporary name, `fsync`ed, renamed
  (atomic on POSIX), and its directory is `fsync`ed so the rename survives a
  power loss; directories created on the way are `fsync`ed once, up the tree;
- object stores (S3, GCS, Azure): an object appears only when its upload
  completes (a single put, or the final call of a multipart upload), entire or
  not at all, and is durable once the call returns; there is no rename, so
  files go straight to their final key;
- HDFS (and any other): temporary name, `close` (the HDFS client returns once
  the blocks are acknowledged by the replication pipeline), then rename, which
  the NameNode makes atomic.

Blocking calls: run them in a thread (the Faust shell does, with
`asyncio.to_thread`); pyarrow releases the GIL while encoding and writing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from streams.archive_layout import FileRange, hour_dir, topic_dir
from streams.storage import fsync_dir, locate

ROW_GROUP_ROWS = 128 * 1024
COMPRESSION = "zstd"


@dataclass(frozen=True)
class Written:
    """A file written and durable under `temp`, to be published as `final`."""

    temp: str
    final: str


class ArchiveStore:
    def __init__(self, uri: str) -> None:
        where = locate(uri)
        self.uri = where.uri
        self.fs, self.root = where.fs, where.path
        self.local, self.atomic_put = where.local, where.atomic_put
        self._durable_dirs: set[str] = set()

    def topic_path(self, topic: str) -> str:
        return f"{self.root}/{topic_dir(topic)}"

    def dir_of(self, topic: str, hour: int) -> str:
        return f"{self.topic_path(topic)}/{hour_dir(hour)}"

    def write(self, topic: str, hour: int, frange: FileRange, table: pa.Table, token: str) -> Written:
        """Write one file so that it is durable, but not yet visible under its final name.

        `token` makes the temporary name unique to this writer."""
        folder = self.dir_of(topic, hour)
        final = f"{folder}/{frange.name}"
        if self.atomic_put:
            self._write(table, final)
            return Written(final, final)
        self._ensure_dir(folder)
        temp = f"{folder}/{frange.temp_name(token)}"
        self._write(table, temp)
        if self.local:
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return Written(temp, final)

    def _write(self, table: pa.Table, path: str) -> None:
        pq.write_table(table, path, filesystem=self.fs, compression=COMPRESSION,
                       row_group_size=ROW_GROUP_ROWS, write_statistics=True)

    def publish(self, written: list[Written]) -> None:
        """Rename every file to its final name, then make the renames durable."""
        folders = set()
        for w in written:
            if w.temp != w.final:
                self.fs.move(w.temp, w.final)
                folders.add(w.final.rsplit("/", 1)[0])
        if self.local:
            for folder in sorted(folders):
                fsync_dir(folder)

    def _ensure_dir(self, folder: str) -> None:
        if folder in self._durable_dirs:
            return
        self.fs.create_dir(folder, recursive=True)
        if self.local:
            # A new directory's entry lives in its parent: fsync up to the root.
            path = folder
            while len(path) > len(self.root) and path not in self._durable_dirs:
                fsync_dir(path)
                fsync_dir(path.rsplit("/", 1)[0])
                self._durable_dirs.add(path)
                path = path.rsplit("/", 1)[0]
        self._durable_dirs.add(folder)

    def list_topic(self, topic: str) -> list[str]:
        """Every file under the topic's folder (final and temporary)."""
        selector = pafs.FileSelector(self.topic_path(topic), recursive=True, allow_not_found=True)
        return [info.path for info in self.fs.get_file_info(selector)
                if info.type == pafs.FileType.File]

    def delete(self, paths) -> None:
        folders = set()
        for path in paths:
            self.fs.delete_file(path)
            folders.add(path.rsplit("/", 1)[0])
        if self.local:
            for folder in sorted(folders):
                fsync_dir(folder)

