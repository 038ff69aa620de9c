"""Models served: loaded from their announcements on `models`, hot-swapped by reference.

`clickloop train` writes an artifact (services/model/artifact.py) and announces
it on the compacted `models` topic, keyed by model name. `ModelWatcher` reads
that topic from the beginning at start-up, loads the served model (and the
shadow model, if any), then keeps consuming. A new announcement is loaded and
verified (content hash) in a worker thread while requests go on with the old
model; the swap is one dict assignment on the event loop, and a request takes
its model reference once, so no request ever sees half of a model. A model
that fails to load or verify is refused and the previous one stays.

Start-up keeps that promise as far as the topic allows: every announcement of
a served name read before loading is a candidate (`Candidates`), and the
newest one that loads and verifies is served, so a bad newest announcement
does not leave a restarted recommender on the fallback while an older good
one is still on the topic. Compaction eventually keeps only the newest record
per name; once it has, the only remedy is announcing a good version again.

`ServedModel` is what inference needs: the catalogue (item ids, factors,
popularity prior), the known users' rows and a `FoldIn` for users the model
has not seen, built from their recent items with the shared transform
(`services.model.transform.user_vector`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from services.model import artifact as artifacts
from services.model.als import AlsParams, FoldIn
from services.model.transform import user_vector
from services.recommender.follower import TopicFollower
from services.recommender.ranking import Catalogue
from services.settings import Settings
from streams import topics
from streams.storage import locate

log = logging.getLogger("clickloop.recommender.models")
ALS_FIELDS = frozenset(AlsParams.__dataclass_fields__)
# Announcements kept per served name until tried (a few hundred bytes each): a topic
# whose tail compaction has not reached yet can hold a long run of them.
MAX_CANDIDATES = 1000
ERRORS_SHOWN = 5   # refusals named in /health's model_error (the log has all)


class ModelError(Exception):
    """An announcement or artifact the recommender refuses to serve from."""


@dataclass(frozen=True, slots=True)
class Announcement:
    """A `models` record: which version of which model, where, with which content hash."""

    name: str
    version: str
    path: str
    content_sha256: str

    @classmethod
    def parse(cls, value: bytes) -> "Announcement":
        try:
            d = orjson.loads(value)
            if d.get("v") != 1:
                raise ModelError(f"announcement format {d.get('v')!r}, this reader knows 1")
            return cls(str(d["name"]), str(d["version"]), str(d["path"]), str(d["content_sha256"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"unreadable announcement: {exc!r}") from None


class ServedModel:
    """One loaded, verified model version: everything a request needs to score."""

    def __init__(self, art: artifacts.Artifact) -> None:
        m, a = art.manifest, art.arrays
        try:
            items, users, user_ids = a["item_factors"], a["user_factors"], a["user_ids"]
        except KeyError as exc:
            raise ModelError(f"{art.path}: artifact lacks array {exc}") from None
        if items.ndim != 2 or users.ndim != 2 or users.shape[1] != items.shape[1] \
                or len(user_ids) != users.shape[0]:
            raise ModelError(f"{art.path}: factor shapes {items.shape} / {users.shape} / "
                             f"{user_ids.shape} do not fit together")
        items, users = np.ascontiguousarray(items, np.float32), np.ascontiguousarray(users, np.float32)
        # A float64 sum of float32 values cannot overflow, so it is finite exactly when
        # every value is, without a mask as big as the matrix.
        if not all(np.isfinite(f.sum(dtype=np.float64)) for f in (items, users)):
            raise ModelError(f"{art.path}: factors that are not all finite (NaN or inf)")
        self.name, self.version, self.path = m.name, m.version, art.path
        self.content_sha256 = m.content_sha256
        self.catalogue = Catalogue(m.item_ids, items, a.get("item_popularity"))
        self.user_factors = users
        self.user_rows = {str(u): i for i, u in enumerate(user_ids.tolist())}
        params = AlsParams(**{k: v for k, v in m.params.items() if k in ALS_FIELDS})
        self.fold = FoldIn(self.catalogue.factors, params)
        self.factors = items.shape[1]

    def vector(self, visitor: str, recent: Iterable) -> np.ndarray | None:
        """The visitor's row when the model knows them, else folded in from their recent
        items (the shared transform), else None (cold start)."""
        row = self.user_rows.get(visitor)
        if row is not None:
            return self.user_factors[row]
        return user_vector(recent, self.catalogue.index, self.fold) if recent else None

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "items": len(self.catalogue.ids),
                "users": len(self.user_rows), "factors": self.factors,
                "content_sha256": self.content_sha256}


def load(ann: Announcement, root: str) -> ServedModel:
    """Read, verify and build a model (blocking: run it in a thread). The announcement's
    path is a URI or an absolute path; a relative one is taken under the artifact root."""
    path = ann.path
    if "://" not in path and not Path(path).is_absolute() and not Path(path).exists():
        path = str(locate(root).child(path))
    try:
        art = artifacts.read(path)
    except artifacts.ArtifactError as exc:
        raise ModelError(str(exc)) from None
    m = art.manifest
    if (m.name, m.version, m.content_sha256) != (ann.name, ann.version, ann.content_sha256):
        raise ModelError(f"{path}: holds {m.name} {m.version} ({m.content_sha256[:12]}), the "
                         f"announcement says {ann.name} {ann.version} ({ann.content_sha256[:12]})")
    return ServedModel(art)


class Candidates:
    """Announcements per served name not yet tried, oldest first: what `ModelWatcher`
    folds from the topic and then loads, newest first, until one loads.

    Only the four fields loading needs are kept, an announcement seen again moves to
    the newest place instead of being kept twice, and at most `MAX_CANDIDATES` per
    name are kept (the oldest dropped)."""

    def __init__(self, names: Iterable[str], limit: int = MAX_CANDIDATES) -> None:
        self.names = frozenset(names)
        self.limit = limit
        self.by_name: dict[str, list[Announcement]] = {}

    def add(self, key: bytes | None, value: bytes | None) -> Announcement | None:
        """Fold one `models` record: the announcement kept, None for a record of a name
        not served or a tombstone; ModelError for an unreadable announcement or one whose
        name is not its key (it would be served under the wrong name)."""
        name = key.decode(errors="replace") if key is not None else None
        if name not in self.names or value is None:
            return None
        ann = Announcement.parse(value)
        if ann.name != name:
            raise ModelError(f"announcement of model {ann.name!r} {ann.version} under the key "
                             f"{name!r}: the key must be the model name")
        kept = self.by_name.setdefault(name, [])
        if ann in kept:
            kept.remove(ann)
        kept.append(ann)
        if len(kept) > self.limit:
            del kept[0]
        return ann

    def take(self) -> dict[str, list[Announcement]]:
        """Each name's candidates, NEWEST FIRST, and forget them."""
        taken, self.by_name = self.by_name, {}
        return {name: anns[::-1] for name, anns in taken.items()}

    def __bool__(self) -> bool:
        return bool(self.by_name)


class ModelWatcher:
    """The models served by name (`current`), following the `models` topic."""

    def __init__(self, settings: Settings, names: Iterable[str],
                 on_event: Callable[[str, str], None] = lambda name, outcome: None) -> None:
        self.settings = settings
        self.names = frozenset(n for n in names if n)
        self.current: dict[str, ServedModel] = {}
        self.on_event = on_event   # (model name, "loaded" | "failed") for metrics
        self._pending = Candidates(self.names)   # folded, not yet tried
        self._unreadable: list[str] = []         # records `_fold` refused since the last load:
        self._unreadable_count = 0               # the newest ERRORS_SHOWN, and how many
        self._refusals: dict[str | None, str] = {}   # name (None: unreadable) -> its report
        self._follower = TopicFollower(settings, (topics.MODELS,), self._fold, self._load_pending,
                                       "models topic")

    @property
    def last_error(self) -> str | None:
        """What /health shows as `model_error`: the feed being down, and per name the
        refusals since its last successful load (unreadable records: until a model loads
        after them)."""
        parts = [self._follower.error, *self._refusals.values()]
        return " | ".join(p for p in parts if p) or None

    def get(self, name: str) -> ServedModel | None:
        return self.current.get(name)

    async def _load_pending(self) -> None:
        """Load and swap in, per name, the newest candidate `_fold` found that loads and
        verifies (artifact reads in a thread). Candidates are newer than the model served,
        except after a reconnect re-reads the topic: the one served then stops the search."""
        loaded = False
        for name, anns in self._pending.take().items():
            have = self.current.get(name)
            refused: list[str] = []   # newest first
            for ann in anns:
                if have is not None and (have.version, have.content_sha256) == (ann.version, ann.content_sha256):
                    break
                t0 = time.perf_counter()
                try:
                    model = await asyncio.to_thread(load, ann, self.settings.model_root)
                except Exception as exc:  # any bad artifact is refused, never a crash loop
                    refused.append(f"{name} {ann.version}: {exc}")
                    log.error("model %s %s refused: %s", name, ann.version, exc)
                    self.on_event(name, "failed")
                    continue
                self.current[name] = model  # the swap: requests pick up the new reference
                self.on_event(name, "loaded")
                self._refusals.pop(name, None)
                loaded = True
                log.info("serving %s %s (%d items) loaded in %.0f ms", name, ann.version,
                         len(model.catalogue.ids), (time.perf_counter() - t0) * 1000)
                break
            if refused:
                self._refusals[name] = refusals(refused, len(refused), self.current.get(name))
                if self.current.get(name) is have:
                    log.error("%s: kept %s", name, have.version if have else "no model")
        if self._unreadable:
            self._refusals[None] = refusals(self._unreadable[::-1], self._unreadable_count, None)
            self._unreadable, self._unreadable_count = [], 0
        elif loaded:
            self._refusals.pop(None, None)

    def _fold(self, records) -> bool:
        """Every announcement of a served name in a batch (tried by `_load_pending`)."""
        for r in records:
            try:
                self._pending.add(r.key, r.value)
            except ModelError as exc:
                self._unreadable = [*self._unreadable[1 - ERRORS_SHOWN:],
                                    f"{r.key.decode(errors='replace')}: {exc}"]
                self._unreadable_count += 1
                log.error("models record %s[%d]@%d: %s", r.topic, r.partition, r.offset, exc)
        return bool(self._pending) or bool(self._unreadable)

    async def start(self, wait_s: float) -> None:
        """Start following the topic; wait up to `wait_s` for the first models to load."""
        if not await self._follower.start(wait_s):
            log.warning("no model loaded within %.0f s; serving fallback until one is", wait_s)

    async def stop(self) -> None:
        await self._follower.stop()


def refusals(newest_first: list[str], count: int, serving: ServedModel | None) -> str:
    """Part of /health's `model_error`: `count` refused announcements, the newest
    `ERRORS_SHOWN` named (the log has all), and for one name what it serves instead."""
    shown = "; ".join(newest_first[:ERRORS_SHOWN])
    more = f"; and {count - ERRORS_SHOWN} older refused" if count > ERRORS_SHOWN else ""
    now = f" (serving {serving.name} {serving.version})" if serving is not None else ""
    return f"{shown}{more}{now}"
