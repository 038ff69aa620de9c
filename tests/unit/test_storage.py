"""Locations under a folder or a filesystem URI (streams/storage.py): naming, not I/O."""
from __future__ import annotations

import pyarrow.fs as pafs

from streams.storage import locate


def test_a_relative_folder_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where = locate("models")
    assert where.path == where.uri == str(tmp_path / "models")
    assert where.local and not where.atomic_put


def test_a_file_uri_names_its_folder(tmp_path):
    for uri in (f"file://{tmp_path}/models", f"file://{tmp_path}/models/"):
        where = locate(uri)
        assert isinstance(where.fs, pafs.LocalFileSystem)
        assert where.uri == where.path == f"{tmp_path}/models"


def test_children_keep_the_filesystem_and_the_uri_query(monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    root = locate("s3://bucket/pre/fix/?region=eu-west-1&endpoint_override=127.0.0.1:9&scheme=http")
    assert root.path == "bucket/pre/fix" and root.atomic_put and not root.local
    child = root.child("als", "v1")
    assert child.fs is root.fs and child.path == "bucket/pre/fix/als/v1"
    assert child.uri == "s3://bucket/pre/fix/als/v1?region=eu-west-1&endpoint_override=127.0.0.1:9&scheme=http"
    # the child's URI opens the same place on its own
    again = locate(child.uri)
    assert again.path == child.path and again.uri == child.uri and again.atomic_put


def test_local_children():
    assert locate("/srv/models").child("als/v1").uri == "/srv/models/als/v1"
