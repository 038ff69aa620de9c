"""`clickloop train --precompute`: batch inference, the top k of every active user into Redis.

Active users are those with an interaction in the last `--active-days` of the
training data (counted back from its last event time, not from the clock, so a
run over an old range still has users). Each list comes from the serving ranker
(`services.recommender.ranking.rank`) with the final model: the user's vector,
the items they interacted with excluded, popularity blended by their number of
items, exactly the path the recommender takes for a known user.

Redis (the training job owns the `topk:*` keys; the recommender only reads them):

    STRING <prefix>topk:<visitor> = {"name", "version", "items": [[item, score], ...],
                                     "computed_ms"}      TTL CLICKLOOP_TOPK_TTL_S

written with SET ... EX through non-transactional pipelines of `BATCH` commands.
`name`/`version` let the recommender serve a list only while it serves that
model (lists are written before the announcement, so a new version's lists are
there when the service swaps it in); an inactive user's list expires with its TTL.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import orjson

from services.model.transform import Interaction
from services.recommender.ranking import DEFAULT_SHRINK, Ranking, rank
from services.settings import Settings

DAY_MS = 86_400_000
BATCH = 1000            # SET commands per pipeline round trip


def last_seen(rows: Iterable[Interaction]) -> dict[str, int]:
    """Each user's latest interaction time."""
    last: dict[str, int] = {}
    for r in rows:
        if r.ts > last.get(r.user, r.ts - 1):
            last[r.user] = r.ts
    return last


def active_users(last: Mapping[str, int], end_ms: int, active_days: float) -> list[str]:
    """Users whose latest interaction is within `active_days` before `end_ms` (inclusive), sorted."""
    since = end_ms - int(active_days * DAY_MS)
    return sorted(user for user, ts in last.items() if ts >= since)


def topk_value(name: str, version: str, ranking: Ranking, computed_ms: int) -> bytes:
    """The JSON value of a `topk:<visitor>` key."""
    return orjson.dumps({"name": name, "version": version,
                         "items": [[item, float(score)] for item, score in
                                   zip(ranking.items, ranking.scores)],
                         "computed_ms": computed_ms})


def rankings(trained, users: Iterable[str], k: int,
             shrink: float = DEFAULT_SHRINK) -> Iterator[tuple[str, Ranking]]:
    """The serving ranker's top k for each user of the final model (train.Trained)."""
    catalogue = trained.catalogue()
    m = trained.matrix
    rows = {u: r for r, u in enumerate(m.users)}
    ids, csr, vectors = m.items, m.matrix, trained.factors.users
    for user in users:
        r = rows[user]
        seen = [ids[j] for j in csr.indices[csr.indptr[r]:csr.indptr[r + 1]]]
        yield user, rank(catalogue, vectors[r], k, seen=seen, n_interactions=len(seen), shrink=shrink)


def write(client, entries: Iterable[tuple[str, bytes]], ttl_s: int, batch: int = BATCH) -> int:
    """SET key value EX ttl for each entry, `batch` commands per pipeline; returns the count."""
    written = 0
    pipe = client.pipeline(transaction=False)
    for key, value in entries:
        pipe.set(key, value, ex=ttl_s)
        written += 1
        if written % batch == 0:
            pipe.execute()
    pipe.execute()
    return written


def precompute(settings: Settings, options, trained, rows: list[Interaction], version: str,
               computed_ms: int) -> dict:
    """Write the active users' top-k lists; returns what was done (for the summary and --json)."""
    import redis

    from services.model.train import TrainError

    users = active_users(last_seen(rows), trained.data_range[1], options.active_days)
    entries = ((settings.redis_key("topk", user), topk_value(options.name, version, ranking, computed_ms))
               for user, ranking in rankings(trained, users, options.precompute_k))
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    try:
        written = write(client, entries, settings.topk_ttl_s)
    except redis.RedisError as exc:
        raise TrainError(f"writing top-k lists to Redis at {settings.redis_url} failed: "
                         f"{type(exc).__name__}: {exc}. The artifact is written and not yet "
                         f"announced; start Redis (`clickloop infra start`) and train again, or "
                         f"train without --precompute") from None
    finally:
        client.close()
    return {"users": written, "k": options.precompute_k, "ttl_s": settings.topk_ttl_s,
            "active_days": options.active_days, "pattern": settings.redis_key("topk", "<visitor>")}
