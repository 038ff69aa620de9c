"""Model artifact: round trip, content hash, tamper detection, write-once versions."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import orjson
import pytest

from services.model.artifact import (ARRAYS, MANIFEST, ArtifactError, Manifest, announcement,
                                     content_hash, read, verify, write)


def manifest(version: str = "20260101T000000Z") -> Manifest:
    return Manifest(name="als", version=version, created_ms=1_767_225_600_000,
                    data_range=(1_764_547_200_000, 1_767_225_599_999),
                    params={"factors": 4, "alpha": 10.0, "backend": "numpy"},
                    metrics={"recall@10": 0.42, "ndcg@10": 0.21, "popularity": {"recall@10": 0.1}},
                    item_ids=["i1", "i2", "i3"])


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"item_factors": rng.standard_normal((3, 4)).astype(np.float32),
            "user_factors": rng.standard_normal((2, 4)).astype(np.float32),
            "user_ids": np.array(["u1", "user-two"])}


def test_round_trip(tmp_path):
    written = write(tmp_path, manifest(), arrays())
    assert written.path == str(tmp_path / "als" / "20260101T000000Z")
    assert len(written.manifest.content_sha256) == 64
    back = read(written.path)
    assert back.manifest == written.manifest
    assert back.manifest.data_range == (1_764_547_200_000, 1_767_225_599_999)
    assert back.manifest.arrays["item_factors"] == {"dtype": "<f4", "shape": [3, 4]}
    for name, a in arrays().items():
        assert np.array_equal(back.arrays[name], a) and back.arrays[name].dtype == a.dtype
    assert verify(written.path) == written.manifest
    assert sorted(p.name for p in (tmp_path / "als").iterdir()) == ["20260101T000000Z"], "no temp left"


def test_hash_covers_every_part():
    base = manifest()
    h = content_hash(base, arrays())
    assert h == content_hash(base, arrays()), "deterministic"
    assert h == content_hash(dataclasses.replace(base, content_sha256="x"), arrays()), \
        "the hash field itself is not hashed"
    changed = arrays()
    changed["item_factors"][0, 0] += 1e-3
    variants = [
        content_hash(dataclasses.replace(base, version="other"), arrays()),
        content_hash(dataclasses.replace(base, metrics={"recall@10": 0.43}), arrays()),
        content_hash(dataclasses.replace(base, item_ids=["i1", "i3", "i2"]), arrays()),
        content_hash(base, changed),
        content_hash(base, {**arrays(), "item_factors": arrays()["item_factors"].astype(np.float64)}),
        content_hash(base, {**arrays(), "item_factors": arrays()["item_factors"].reshape(4, 3)}),
        content_hash(base, {k: v for k, v in arrays().items() if k != "user_ids"}),
    ]
    assert h not in variants and len(set(variants)) == len(variants)


def rewrite_manifest(path, **changes):
    d = orjson.loads((path / MANIFEST).read_bytes())
    d.update(changes)
    (path / MANIFEST).write_bytes(orjson.dumps(d))


def tamper_array(path):
    with np.load(path / ARRAYS) as npz:
        data = {n: npz[n] for n in npz.files}
    data["item_factors"] = data["item_factors"] * 2
    with open(path / ARRAYS, "wb") as f:
        np.savez(f, **data)


@pytest.mark.parametrize("tamper,why", [
    (lambda p: rewrite_manifest(p, metrics={"recall@10": 0.99}), "better metrics written in"),
    (lambda p: rewrite_manifest(p, item_ids=["i3", "i2", "i1"]), "item ids reordered"),
    (lambda p: rewrite_manifest(p, format=99), "unknown format"),
    (lambda p: rewrite_manifest(p, name=None) or rewrite_manifest(p, version=None), "mangled fields"),
    (tamper_array, "factors changed"),
    (lambda p: (p / ARRAYS).write_bytes((p / ARRAYS).read_bytes()[:100]), "truncated arrays"),
    (lambda p: (p / MANIFEST).unlink(), "manifest gone"),
    (lambda p: (p / MANIFEST).write_bytes(b"{"), "manifest not JSON"),
])
def test_tampering_is_refused(tmp_path, tamper, why):
    written = write(tmp_path, manifest(), arrays())
    tamper(Path(written.path))
    with pytest.raises(ArtifactError):
        read(written.path)


def test_a_file_uri_root_is_the_folder(tmp_path):
    """`CLICKLOOP_MODEL_DIR=file:///…` writes the same folder, named by its path (what the
    announcement carries)."""
    written = write(f"file://{tmp_path}", manifest(), arrays())
    assert written.path == str(tmp_path / "als" / "20260101T000000Z")
    assert read(f"file://{written.path}").manifest == read(written.path).manifest == written.manifest


def test_versions_are_written_once_and_names_are_plain(tmp_path):
    write(tmp_path, manifest(), arrays())
    with pytest.raises(ArtifactError):
        write(tmp_path, manifest(), arrays())
    for bad in ("", "../x", ".hidden", "v?x=1"):
        with pytest.raises(ArtifactError):
            write(tmp_path, manifest(version=bad), arrays())


def test_announcement_names_the_verified_artifact(tmp_path):
    written = write(tmp_path, manifest(), arrays())
    record = announcement(written)
    assert record == {"v": 1, "name": "als", "version": "20260101T000000Z", "path": str(written.path),
                      "content_sha256": written.manifest.content_sha256,
                      "created_ms": 1_767_225_600_000,
                      "data_range": [1_764_547_200_000, 1_767_225_599_999],
                      "metrics": manifest().metrics}
