"""The model artifact: a folder `<root>/<name>/<version>/` with `arrays.npz` and `manifest.json`.

The manifest says what the model is (name, version, creation time, the event
time range of its training data, parameters, evaluation metrics, the item id
of every item-factor row, each array's dtype and shape) and carries
`content_sha256`, a SHA-256 over the manifest without that field (canonical
JSON, sorted keys) and every array (name, dtype, shape and C-order bytes,
sorted by name). Reading verifies it, so a truncated copy or an edited file is
refused with `ArtifactError` before the recommender serves from it.

The root is a local folder or any filesystem URI (`CLICKLOOP_MODEL_DIR`,
streams/storage.py): trainers and recommenders on different hosts share an
object store (`s3://bucket/models`) or a volume. A version is written once, so
that a reader never sees half an artifact: locally and on HDFS into a hidden
temporary folder, then renamed into place (locally with `fsync`s); on an
object store, where an object appears whole or not at all and nothing
renames, straight to its keys, the manifest last (the announcement comes only
after `write` returns, and the content hash refuses any partial copy). Writing
an existing version is refused. Arrays are loaded with `allow_pickle=False`
(ids are unicode arrays): from a local folder in place, from a remote store in
ranged reads of `REMOTE_READ_BYTES` straight into the arrays.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import orjson

from streams.storage import Location, fsync_dir, locate

FORMAT = 1
MANIFEST, ARRAYS = "manifest.json", "arrays.npz"
# A remote artifact is read in ranges of this size (one request each): peak memory is
# the arrays plus one range, where reading the file whole first doubled it.
REMOTE_READ_BYTES = 8 << 20


class ArtifactError(Exception):
    """An artifact that cannot be written, read or trusted; str(error) says which and why."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """What an artifact holds and where its data came from (manifest.json)."""

    name: str
    version: str
    created_ms: int
    data_range: tuple[int, int] | None      # first and last training event time (epoch ms)
    params: dict
    metrics: dict
    item_ids: list[str]
    arrays: dict[str, dict] = field(default_factory=dict)   # name -> {"dtype", "shape"}
    content_sha256: str = ""

    def as_dict(self) -> dict:
        """The manifest.json content."""
        return {"format": FORMAT, "name": self.name, "version": self.version,
                "created_ms": self.created_ms,
                "data_range": list(self.data_range) if self.data_range else None,
                "params": self.params, "metrics": self.metrics, "item_ids": self.item_ids,
                "arrays": self.arrays, "content_sha256": self.content_sha256}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Manifest":
        """Parse manifest.json; ArtifactError for another format or missing fields."""
        if d.get("format") != FORMAT:
            raise ArtifactError(f"manifest format {d.get('format')!r}, this reader knows {FORMAT}")
        try:
            return cls(d["name"], d["version"], d["created_ms"],
                       tuple(d["data_range"]) if d["data_range"] else None, d["params"],
                       d["metrics"], list(d["item_ids"]), d["arrays"], d["content_sha256"])
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"manifest lacks or mangles {exc}") from None


@dataclass(frozen=True, slots=True)
class Artifact:
    """A verified artifact: its folder (a path or a URI), manifest and arrays."""

    path: str
    manifest: Manifest
    arrays: dict[str, np.ndarray]


def content_hash(manifest: Manifest, arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the manifest (without its hash) and the arrays, canonical order."""
    h = hashlib.sha256(b"clickloop-artifact\0")
    fields = manifest.as_dict()
    del fields["content_sha256"]
    h.update(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS))
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(b"\0" + name.encode() + b"\0" + a.dtype.str.encode() + b"\0" +
                 orjson.dumps(list(a.shape)) + b"\0")
        h.update(a.data)   # the C-order bytes, without copying them
    return h.hexdigest()


def artifact_dir(root: str | Path, name: str, version: str) -> Location:
    """Where a version of a model lives under the artifact root."""
    return locate(root).child(name, version)


def write(root: str | Path, manifest: Manifest, arrays: Mapping[str, np.ndarray]) -> Artifact:
    """Write a new version (all or nothing); returns it with the manifest's hash filled in."""
    for part in (manifest.name, manifest.version):
        if not part or part.startswith(".") or "/" in part or os.sep in part or "?" in part:
            raise ArtifactError(f"name and version must be plain folder names, not {part!r}")
    final = artifact_dir(root, manifest.name, manifest.version)
    if final.exists():
        raise ArtifactError(f"{final} exists: versions are written once")
    arrays = {n: np.ascontiguousarray(a) for n, a in arrays.items()}
    spec = {n: {"dtype": a.dtype.str, "shape": list(a.shape)} for n, a in sorted(arrays.items())}
    unsigned = replace(manifest, arrays=spec, content_sha256="")
    signed = replace(unsigned, content_sha256=content_hash(unsigned, arrays))
    files = {ARRAYS: _npz(arrays),
             MANIFEST: orjson.dumps(signed.as_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)}
    if final.atomic_put:
        for name, data in files.items():   # the manifest last
            _put(final.fs, f"{final.path}/{name}", data)
    else:
        _write_and_rename(final, files)
    return Artifact(final.uri, signed, arrays)


def _npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)  # type: ignore[arg-type]
    return out.getvalue()


def _put(fs, path: str, data: bytes, sync: bool = False) -> None:
    if sync:   # a local file: on disk before a rename makes it visible
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def _write_and_rename(final: Location, files: Mapping[str, bytes]) -> None:
    fs, parent = final.fs, final.path.rsplit("/", 1)[0]
    tmp = f"{parent}/.{final.path.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
    fs.create_dir(tmp, recursive=True)
    try:
        for name, data in files.items():
            _put(fs, f"{tmp}/{name}", data, sync=final.local)
        if final.local:
            fsync_dir(tmp)
        fs.move(tmp, final.path)
        if final.local:
            fsync_dir(parent)
    except BaseException:
        try:
            fs.delete_dir(tmp)
        except OSError:
            pass
        raise


def read(where: str | Path) -> Artifact:
    """Load and verify an artifact folder (a path or a URI); ArtifactError when missing,
    unreadable or tampered."""
    try:
        loc = locate(where)
        with loc.fs.open_input_stream(f"{loc.path}/{MANIFEST}") as f:
            manifest = Manifest.from_dict(orjson.loads(f.read()))
        with contextlib.ExitStack() as stack:
            if loc.local:   # read in place
                source = f"{loc.path}/{ARRAYS}"
            else:   # ranged reads of REMOTE_READ_BYTES: never the whole file besides the arrays
                source = stack.enter_context(io.BufferedReader(
                    loc.fs.open_input_file(f"{loc.path}/{ARRAYS}"), buffer_size=REMOTE_READ_BYTES))
            with np.load(source, allow_pickle=False) as npz:
                arrays = {n: npz[n] for n in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{where}: unreadable artifact: {exc}") from None
    path = loc.uri
    spec = {n: {"dtype": a.dtype.str, "shape": list(a.shape)} for n, a in sorted(arrays.items())}
    if spec != manifest.arrays:
        raise ArtifactError(f"{path}: arrays {spec} differ from the manifest's {manifest.arrays}")
    actual = content_hash(manifest, arrays)
    if actual != manifest.content_sha256:
        raise ArtifactError(f"{path}: content hash {actual} != manifest's {manifest.content_sha256}")
    return Artifact(path, manifest, arrays)


def verify(path: str | Path) -> Manifest:
    """The manifest of an artifact whose content matches its hash; ArtifactError otherwise."""
    return read(path).manifest


def announcement(artifact: Artifact) -> dict:
    """The record announcing a model on the compacted `models` topic (keyed by name)."""
    m = artifact.manifest
    return {"v": 1, "name": m.name, "version": m.version, "path": artifact.path,
            "content_sha256": m.content_sha256, "created_ms": m.created_ms,
            "data_range": list(m.data_range) if m.data_range else None, "metrics": m.metrics}
