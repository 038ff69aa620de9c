"""`clickloop train`: the recommender's model from the Parquet archive, evaluated, written, announced.

1. Read: the `clicks` rows of the archive (streams/archive_*: the flushes the
   archive worker has committed, hour folders pruned and rows filtered by event
   time `[--since, --until)`), each row back to its event JSON
   (archive_records.rows_json), then THE shared transform
   (services/model/transform.py) turns events into interactions.
2. Evaluate: a time-based hold-out (services/model/split.py): a model trained on
   the interactions before the cutoff is scored on what came after it with
   recall@k and NDCG@k through the serving ranker, against the popularity
   baseline (services/model/metrics.py).
3. Train the final model on ALL the interactions in range: the hold-out exists
   to measure, and the most recent behaviour is what serving needs most. The
   metrics in the artifact are those of the hold-out model, trained with the
   same parameters on the earlier part of the same data.
4. Write the artifact (services/model/artifact.py) under CLICKLOOP_MODEL_DIR,
   optionally precompute top-k lists into Redis (services/model/precompute.py),
   then announce it on the compacted `models` topic (schemas/models.py).

The pure parts (options, version names, range filters, `fit`) take everything
as arguments; `run` is the shell that reads the clock, the archive, Kafka and
Redis. Every failure a user can cause or fix is a `TrainError` whose message
says what to do; the CLI prints it and exits with 2, never a traceback.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import orjson

from schemas.times import iso_to_ms, ms_to_iso
from services.model import artifact as artifacts
from services.model.als import AlsParams, Backend, Factors, FitError
from services.model.als import train as als_train
from services.model.metrics import Evaluation, evaluate, ranker
from services.model.split import cutoff_for, data_range, holdout_truth, time_split
from services.model.transform import Interaction, InteractionMatrix, interaction_matrix, interactions
from services.recommender.ranking import DEFAULT_SHRINK, Catalogue
from services.settings import Settings

DAY_MS = 86_400_000
MIN_USERS = MIN_ITEMS = 2
MAX_ACTIVE_DAYS = 100_000   # ~270 years: every user, and `days * DAY_MS` stays an exact integer
# Epoch milliseconds below this (1973-03-03) are almost surely epoch seconds.
MIN_PLAUSIBLE_MS = 100_000_000_000
TRANSFORM = "transform.item_weights: strongest action per item (view 1, click 2)"


class TrainError(Exception):
    """Training cannot go on; str(error) says why and what to do."""


# --- options -------------------------------------------------------------------------------

def parse_when(text: str, option: str) -> int:
    """`--since`/`--until`: ISO-8601 (naive = UTC) or epoch milliseconds."""
    raw = text.strip()
    if raw.lstrip("-").isdigit():
        ms = int(raw)
        if 0 < ms < MIN_PLAUSIBLE_MS:
            raise TrainError(f"{option} {text}: that looks like epoch seconds; give epoch "
                             f"milliseconds ({ms * 1000}) or an ISO time")
        return ms
    try:
        return iso_to_ms(raw)
    except ValueError:
        raise TrainError(f"{option} {text!r}: give an ISO-8601 time (e.g. 2026-11-25T10:00:00Z) "
                         f"or epoch milliseconds") from None


@dataclass(frozen=True, slots=True)
class TrainOptions:
    """What one `clickloop train` run does (the command line, validated)."""

    name: str
    since_ms: int | None = None
    until_ms: int | None = None
    test_fraction: float = 0.2
    params: AlsParams = AlsParams()
    backend: Backend = "auto"
    k: int = 10
    announce: bool = True
    precompute: bool = False
    precompute_k: int = 10
    active_days: float = 7.0
    json: bool = False

    @classmethod
    def from_args(cls, args, default_name: str) -> "TrainOptions":
        """Validate the parsed command line; TrainError naming the option otherwise."""
        name = args.name or default_name
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise TrainError(f"--name {name!r}: a model name is a plain folder name "
                             f"(no '/', not starting with '.')")
        since = parse_when(args.since, "--since") if args.since is not None else None
        until = parse_when(args.until, "--until") if args.until is not None else None
        if since is not None and until is not None and since >= until:
            raise TrainError(f"--since {args.since} is not before --until {args.until}: "
                             f"the range is [since, until)")
        if not 0.0 < args.test_fraction < 1.0:
            raise TrainError(f"--test-fraction {args.test_fraction}: give a share between 0 and 1 "
                             f"(e.g. 0.2: the last 20 % of interactions are the hold-out)")
        precompute_k = args.precompute_k if args.precompute_k is not None else args.k
        for option, value in (("--k", args.k), ("--precompute-k", precompute_k)):
            if value < 1:
                raise TrainError(f"{option} {value}: must be at least 1")
        if not 0 < args.active_days <= MAX_ACTIVE_DAYS:  # NaN and inf too
            raise TrainError(f"--active-days {args.active_days}: must be more than 0 and at "
                             f"most {MAX_ACTIVE_DAYS} (every user: a large number of days)")
        try:
            params = AlsParams(factors=args.factors, regularization=args.regularization,
                               alpha=args.alpha, iterations=args.iterations)
        except ValueError as exc:
            raise TrainError(f"ALS parameters: {exc} (--factors, --iterations, --alpha, "
                             f"--regularization)") from None
        return cls(name, since, until, args.test_fraction, params, args.backend, args.k,
                   not args.no_announce, args.precompute, precompute_k, args.active_days, args.json)

    def range_text(self) -> str:
        lo = ms_to_iso(self.since_ms) if self.since_ms is not None else "the beginning"
        hi = ms_to_iso(self.until_ms) if self.until_ms is not None else "the end"
        return f"from {lo} to {hi}"


def in_range(rows: Iterable[Interaction], since_ms: int | None, until_ms: int | None) -> list[Interaction]:
    """The interactions whose event time is in [since, until) (None: unbounded)."""
    return [r for r in rows if (since_ms is None or r.ts >= since_ms)
            and (until_ms is None or r.ts < until_ms)]


def item_counts(rows: Iterable[Interaction], items: Sequence[str]) -> np.ndarray:
    """Interactions per item (float32, aligned with `items`; others ignored): the popularity
    the ranker blends in for light users and ranks cold users by."""
    index = {item: j for j, item in enumerate(items)}
    counts = np.zeros(len(items), np.float32)
    for r in rows:
        j = index.get(r.item)
        if j is not None:
            counts[j] += 1.0
    return counts


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the arrays (names, dtypes, shapes, bytes; sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def version_for(created_ms: int, arrays: Mapping[str, np.ndarray]) -> str:
    """`YYYYmmddTHHMMSS.mmmZ-<8 hex>`: creation time (UTC, fixed width, so versions sort by
    time as strings) and a short hash of the arrays (two runs in one ms still differ)."""
    t = datetime.fromtimestamp(created_ms / 1000, tz=timezone.utc)
    return f"{t:%Y%m%dT%H%M%S}.{created_ms % 1000:03d}Z-{arrays_digest(arrays)[:8]}"


# --- training (pure: arguments in, results out) -------------------------------------------

@dataclass(frozen=True, slots=True)
class Holdout:
    """The hold-out evaluation: a model trained before the cutoff, scored after it."""

    cutoff: int
    train_interactions: int
    test_interactions: int
    model: Evaluation
    popularity: Evaluation

    def metrics(self) -> dict:
        """The artifact's and announcement's `metrics` (schemas/models.py, ModelMetrics)."""
        k = self.model.k
        return {"k": k, "users": self.model.users, "cutoff_ms": self.cutoff,
                "train_interactions": self.train_interactions,
                "test_interactions": self.test_interactions,
                "model": {f"recall@{k}": self.model.recall, f"ndcg@{k}": self.model.ndcg},
                "popularity": {f"recall@{k}": self.popularity.recall,
                               f"ndcg@{k}": self.popularity.ndcg}}


@dataclass(frozen=True, slots=True)
class Trained:
    """The final model (trained on every interaction in range) and its evaluation."""

    matrix: InteractionMatrix
    factors: Factors
    popularity: np.ndarray          # interactions per item, aligned with matrix.items
    holdout: Holdout
    data_range: tuple[int, int]
    interactions: int

    def catalogue(self) -> Catalogue:
        """The serving catalogue of the final model."""
        return Catalogue(self.matrix.items, self.factors.items, self.popularity)

    def arrays(self) -> dict[str, np.ndarray]:
        """The artifact's arrays (names are the recommender's contract)."""
        return {"item_factors": np.ascontiguousarray(self.factors.items, np.float32),
                "user_factors": np.ascontiguousarray(self.factors.users, np.float32),
                "user_ids": np.array(self.matrix.users, dtype=str),
                "item_popularity": np.ascontiguousarray(self.popularity, np.float32)}


def _too_little(what: str, rows: Sequence[Interaction]) -> TrainError:
    users = len({r.user for r in rows})
    items = len({r.item for r in rows})
    return TrainError(f"too little data to train and evaluate: {what} ({len(rows)} interactions, "
                      f"{users} users, {items} items in range). Archive more traffic (`clickloop "
                      f"demo` with `clickloop up` running), widen --since/--until, or change "
                      f"--test-fraction")


def factorize(matrix, params: AlsParams, backend: Backend) -> Factors:
    """ALS (services/model/als.py); factors that are not all finite are a TrainError, so
    nothing of such a run is written or announced."""
    try:
        return als_train(matrix, params, backend)
    except FitError as exc:
        raise TrainError(f"{exc}: nothing written. Lower --alpha or raise --regularization "
                         f"(defaults 10 and 0.1)") from None


def evaluate_holdout(rows: Sequence[Interaction], test_fraction: float, params: AlsParams,
                     backend: Backend, k: int) -> Holdout:
    """Train on the interactions before the cutoff, score model and popularity after it."""
    cutoff = cutoff_for(rows, test_fraction)
    split = time_split(rows, cutoff)
    if not split.train:
        raise _too_little(f"every interaction is at or after the hold-out cutoff "
                          f"{ms_to_iso(cutoff)}", rows)
    past = interaction_matrix(split.train)
    if len(past.users) < MIN_USERS or len(past.items) < MIN_ITEMS:
        raise _too_little(f"before the hold-out cutoff {ms_to_iso(cutoff)} there are "
                          f"{len(past.users)} users and {len(past.items)} items, at least "
                          f"{MIN_USERS} of each are needed", rows)
    truth = holdout_truth(split, set(past.items))
    if not truth:
        raise _too_little("no hold-out user interacted with an item that was new to them and "
                          "known before the cutoff, so nothing can be scored", rows)
    factors = factorize(past.matrix, params, backend)
    catalogue = Catalogue(past.items, factors.items, item_counts(split.train, past.items))
    return Holdout(cutoff, len(split.train), len(split.test),
                   evaluate(ranker(catalogue, past, factors.users, DEFAULT_SHRINK), truth, k),
                   evaluate(ranker(catalogue, past, None, DEFAULT_SHRINK), truth, k))


def fit(rows: Sequence[Interaction], options: TrainOptions) -> Trained:
    """Evaluate on the hold-out, then train the final model on all of `rows`."""
    if not rows:
        raise TrainError(f"no item interactions in the archive {options.range_text()}: "
                         f"training needs `Product Viewed`/`Product Clicked` events with "
                         f"properties.item_id (or product_id). Archive traffic first, or widen "
                         f"--since/--until")
    holdout = evaluate_holdout(rows, options.test_fraction, options.params, options.backend,
                               options.k)
    final = interaction_matrix(rows)
    factors = factorize(final.matrix, options.params, options.backend)
    return Trained(final, factors, item_counts(rows, final.items), holdout,
                   data_range(rows), len(rows))  # type: ignore[arg-type]


def manifest_params(options: TrainOptions, trained: Trained) -> dict:
    """The manifest's `params`: AlsParams (what fold-in needs) and how the run was set up."""
    return {**options.params.as_dict(), "backend": trained.factors.backend, "k": options.k,
            "test_fraction": options.test_fraction, "cutoff_ms": trained.holdout.cutoff,
            "since_ms": options.since_ms, "until_ms": options.until_ms,
            "shrink": DEFAULT_SHRINK, "transform": TRANSFORM}


# --- the archive ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ArchiveRead:
    """What was read from the archive."""

    rows: list[Interaction]
    events: int                 # events in the range
    files: int                  # files read
    uncommitted: int            # files of flushes the archive worker has not committed: not read
    vanished: int               # files deleted between listing and reading
    where: str


def read_archive(settings: Settings, since_ms: int | None, until_ms: int | None,
                 committed: dict[int, int] | None) -> ArchiveRead:
    """The item interactions of the archived `clicks` events in [since, until).

    `committed`: the archive worker's committed offsets by partition (None when
    unknown: then every published file is read)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from schemas.archive import RECORD_TIME, SCHEMAS
    from streams import topics
    from streams.archive_layout import Selection, committed_only, flushes, parse_time_rules, time_field
    from streams.archive_records import rows_json, select
    from streams.archive_store import ArchiveStore
    from streams.sessions import ITEM_EVENTS

    spec = SCHEMAS[topics.CLICKS]
    field = time_field(parse_time_rules(settings.archive_time), topics.CLICKS, spec.event_time,
                       RECORD_TIME)
    # Hour folders prune by time only when they follow event time; rows are filtered
    # by event time below in any case.
    selection = (Selection(field, since_ms, until_ms) if field == spec.event_time
                 else Selection(field))
    store = ArchiveStore(settings.archive_root)
    topic = settings.topic(topics.CLICKS)
    paths = store.list_topic(topic)
    where = f"{store.uri}/topic={topic}"
    units = flushes(paths, Selection(field))
    if not units:
        hint = ("" if topics.CLICKS in settings.archive_topics else
                f" (CLICKLOOP_ARCHIVE_TOPICS={','.join(settings.archive_topics)} leaves clicks out)")
        raise TrainError(f"the archive is empty: no Parquet files under {where} "
                         f"(CLICKLOOP_ARCHIVE_URI){hint}. Run `clickloop up` (or `clickloop worker "
                         f"archive`) while traffic flows (`clickloop demo`), then train again")
    units = flushes(paths, selection)
    uncommitted = 0
    if committed is not None:
        units, uncommitted = committed_only(units, committed)
    item_events = pa.array(sorted(ITEM_EVENTS), pa.string())
    rows: list[Interaction] = []
    events = files = vanished = 0
    for _, flush_paths in units:
        for path in flush_paths:
            try:
                with pq.ParquetFile(path, filesystem=store.fs) as parquet:
                    table = parquet.read()
            except FileNotFoundError:
                vanished += 1
                continue
            files += 1
            table = select(table, selection)
            events += table.num_rows
            # Only item events can be interactions (transform.interaction_of via item_of):
            # the others are not turned back into JSON at all.
            table = table.filter(pc.fill_null(pc.is_in(table["event"], item_events), False))
            if table.num_rows:
                decoded = (orjson.loads(text) for text in rows_json(spec, table).to_pylist())
                rows += in_range(interactions(decoded), since_ms, until_ms)
    return ArchiveRead(rows, events, files, uncommitted, vanished, where)


async def archive_committed(settings: Settings, timeout_s: float = 10.0) -> dict[int, int] | None:
    """The archive worker's committed offsets of `clicks`; None when Kafka does not answer."""
    from services.replay.command import ARCHIVER
    from streams import topics

    try:
        return await asyncio.wait_for(topics.committed_offsets(
            settings, topics.group_id(settings, ARCHIVER), settings.topic(topics.CLICKS)), timeout_s)
    except Exception:  # noqa: BLE001 - any failure means "unknown": read every published file
        return None


# --- the announcement -------------------------------------------------------------------------

async def announce(settings: Settings, artifact: artifacts.Artifact) -> tuple[str, int, int]:
    """Publish the announcement on `models` (key: the name; acks=all, idempotent producer);
    returns the topic, partition and offset."""
    from aiokafka import AIOKafkaProducer

    from streams import topics
    from streams.topics import ensure_topics

    topic = settings.topic(topics.MODELS)
    await asyncio.wait_for(ensure_topics(settings, (topics.MODELS,)), settings.produce_timeout_s + 20)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                enable_idempotence=True)
    await asyncio.wait_for(producer.start(), settings.produce_timeout_s + 20)
    try:
        sent = await asyncio.wait_for(producer.send_and_wait(
            topic, key=artifact.manifest.name.encode(),
            value=orjson.dumps(artifacts.announcement(artifact))), settings.produce_timeout_s)
    finally:
        await producer.stop()
    return topic, sent.partition, sent.offset


# --- the command -------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{x:.4f}"


def summary(options: TrainOptions, read: ArchiveRead, trained: Trained, art: artifacts.Artifact,
            seconds: float, announced: tuple[str, int, int] | None, precomputed: dict | None) -> str:
    """The readable report of a run."""
    h, k = trained.holdout, options.k
    lo, hi = trained.data_range
    m = trained.matrix
    lines = [
        f"model {options.name} version {art.manifest.version}",
        f"  data         {ms_to_iso(lo)} .. {ms_to_iso(hi)} (event time; asked {options.range_text()})",
        f"  archive      {read.where}: {read.files} file(s), {read.events:,} events in range"
        + (f", {read.uncommitted} uncommitted file(s) left out" if read.uncommitted else "")
        + (f", {read.vanished} file(s) deleted while reading" if read.vanished else ""),
        f"  trained on   {len(m.users):,} users, {len(m.items):,} items, {trained.interactions:,} "
        f"interactions ({m.matrix.nnz:,} user-item pairs)",
        f"  ALS          {trained.factors.backend}, {options.params.factors} factors, "
        f"{options.params.iterations} iterations, regularization {options.params.regularization}, "
        f"alpha {options.params.alpha}; hold-out and final models in {seconds:.1f} s",
        f"  hold-out     events from {ms_to_iso(h.cutoff)} on ({h.test_interactions:,} interactions, "
        f"{h.model.users:,} users scored; model trained on the {h.train_interactions:,} before)",
        f"               {'recall@' + str(k):>10}  {'NDCG@' + str(k):>10}",
        f"    model      {_pct(h.model.recall):>10}  {_pct(h.model.ndcg):>10}",
        f"    popularity {_pct(h.popularity.recall):>10}  {_pct(h.popularity.ndcg):>10}",
        f"  artifact     {art.path} (sha256 {art.manifest.content_sha256[:16]}…)",
    ]
    if precomputed is not None:
        lines.append(f"  precomputed  top-{precomputed['k']} for {precomputed['users']:,} users active "
                     f"in the last {options.active_days:g} day(s) of the data -> Redis "
                     f"{precomputed['pattern']} (TTL {precomputed['ttl_s']} s)")
    if announced is not None:
        topic, partition, offset = announced
        lines.append(f"  announced    on {topic} (key {options.name!r}) at partition {partition}, "
                     f"offset {offset}")
    else:
        lines.append("  announced    no (--no-announce): the recommender will not load it")
    return "\n".join(lines)


def run(settings: Settings, args) -> int:
    """`clickloop train`; TrainError for anything the user can fix."""
    options = TrainOptions.from_args(args, settings.model_name)
    # aiokafka logs every failed connection attempt; a failure is reported once, as a TrainError.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    def progress(text: str) -> None:
        if not options.json:
            print(text, file=sys.stderr, flush=True)

    committed = asyncio.run(archive_committed(settings))
    read = read_archive(settings, options.since_ms, options.until_ms, committed)
    progress(f"read {len(read.rows):,} interactions from {read.files} archive file(s)"
             + ("" if committed is not None else
                " (Kafka did not answer: every published file was read, committed or not)"))
    started = time.monotonic()
    trained = fit(read.rows, options)
    seconds = time.monotonic() - started
    arrays = trained.arrays()
    created_ms = int(time.time() * 1000)
    manifest = artifacts.Manifest(options.name, version_for(created_ms, arrays), created_ms,
                                  trained.data_range, manifest_params(options, trained),
                                  trained.holdout.metrics(), list(trained.matrix.items))
    try:
        art = artifacts.write(settings.model_root, manifest, arrays)
    except (artifacts.ArtifactError, OSError, ValueError) as exc:
        raise TrainError(f"could not write the artifact under {settings.model_root} "
                         f"(CLICKLOOP_MODEL_DIR): {exc}") from None
    precomputed = None
    if options.precompute:
        # Before the announcement: when the recommender swaps in this version, its
        # top-k lists are already in Redis.
        from services.model.precompute import precompute
        precomputed = precompute(settings, options, trained, read.rows, art.manifest.version,
                                 int(time.time() * 1000))
    announced = None
    if options.announce:
        try:
            announced = asyncio.run(announce(settings, art))
        except Exception as exc:  # noqa: BLE001 - any Kafka failure: say what was done and what to do
            raise TrainError(f"the artifact is written ({art.path}) but announcing it on "
                             f"{settings.topic('models')} at {settings.kafka_bootstrap} failed: "
                             f"{exc or type(exc).__name__}. Start Kafka (`clickloop infra start`) "
                             f"and train again, or use --no-announce") from None
    if options.json:
        print(orjson.dumps({
            "name": options.name, "version": art.manifest.version, "path": str(art.path),
            "content_sha256": art.manifest.content_sha256, "data_range": list(trained.data_range),
            "metrics": art.manifest.metrics, "backend": trained.factors.backend,
            "users": len(trained.matrix.users), "items": len(trained.matrix.items),
            "interactions": trained.interactions,
            "announced": None if announced is None else
            {"topic": announced[0], "partition": announced[1], "offset": announced[2]},
            "precomputed": precomputed}).decode(), flush=True)
    else:
        print(summary(options, read, trained, art, seconds, announced, precomputed), flush=True)
    return 0
