"""The request path's Redis client: a few multiplexed connections, one round trip per read.

redis-py's asyncio pipeline cost about 160 µs of CPU per request here (its
connection pool, command packing and response parsing are Python layered for
every feature of Redis), a quarter of a request's budget at the throughput we
want. The recommender's hot read is always the same two commands, `HGETALL
user:<visitor>` and `GET topk:<visitor>`, so this client does only that: it
writes both commands in one `write` and reads the two RESP2 replies with
hiredis (the C parser redis-py itself uses when installed; the pure-Python
parser this client had cost ~13 µs per request at saturation).

Connections are multiplexed: Redis answers each connection's commands in
order, so every connection keeps a FIFO of waiting futures and any number of
requests can share it (pipelining across requests, as StackExchange.Redis and
Lettuce do), and the commands of all requests handled in one turn of the
event loop leave in one write (ioredis's auto-pipelining): under load, one
system call and one wake-up of Redis serve many requests. There is no pool to
run dry under a burst: up to `redis_pool` connections are opened lazily, the
next one only when the previous ones each have BUSY replies outstanding.

A request whose caller gave up (its budget passed) leaves its future
cancelled in the FIFO (its late reply is read and dropped in order) and makes the connection suspect: new requests go elsewhere until a reply
arrives. A connection with SUSPECT_LIMIT timeouts and no reply is aborted (its
waiting requests fail at once with `ConnectionError`), so a paused Redis does
not pile requests up behind it nor, once resumed, leave a backlog of late
replies to parse on the event loop; while a single late turn of our own event
loop (the replies were waiting in the socket) costs no reconnection and fails
no other request. A lost connection fails its waiting requests the same way.
"""
from __future__ import annotations

import asyncio
from collections import deque
from urllib.parse import unquote, urlparse

import hiredis

MAX_OUTSTANDING = 10_000   # per connection: past it a request fails at once
BUSY = 64                  # replies outstanding before the next connection is used
SUSPECT_LIMIT = 8          # timeouts without a reply before a connection is dropped


class RespError(Exception):
    """An error reply from Redis (`-ERR …`)."""


_MORE = object()   # hiredis: no complete reply buffered yet


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[tuple[asyncio.Future, int, list]] = deque()  # future, replies, got
        self.reader = hiredis.Reader(replyError=RespError, notEnoughData=_MORE)
        self.closed = False
        self.pending: list[bytes] = []
        self.timeouts = 0   # callers that gave up since the last reply

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reader, waiting = self.reader, self.waiting
        reader.feed(data)
        try:
            while waiting:
                value = reader.gets()
                if value is _MORE:
                    break
                fut, want, replies = waiting[0]
                replies.append(value)
                if len(replies) == want:
                    waiting.popleft()
                    self.timeouts = 0
                    if not fut.done():
                        fut.set_result(replies)
        except hiredis.ProtocolError as exc:
            self._fail(ConnectionError(f"unreadable reply from Redis: {exc}"))
            if self.transport is not None:
                self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        while self.waiting:
            fut, _, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        self._fail(ConnectionError(f"Redis connection lost: {exc!r}"))

    def abort(self) -> None:
        if not self.closed:
            self._fail(ConnectionError("Redis did not answer within the budget"))
            if self.transport is not None:
                self.transport.abort()

    def send(self, payload: bytes, replies: int) -> asyncio.Future:
        if len(self.waiting) >= MAX_OUTSTANDING:
            raise ConnectionError(f"{MAX_OUTSTANDING} replies outstanding on one connection")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiting.append((fut, replies, []))
        # Commands of every request handled in this turn of the event loop leave in one
        # write (one system call, one wake-up of Redis) at the end of the turn.
        if not self.pending:
            loop.call_soon(self._flush)
        self.pending.append(payload)
        return fut

    def _flush(self) -> None:
        pending, self.pending = self.pending, []
        if not self.closed and self.transport is not None:
            self.transport.write(b"".join(pending))


class FeatureClient:
    """`await read(user_key, topk_key)` -> (HGETALL as a dict, GET value or None)."""

    def __init__(self, url: str, connections: int) -> None:
        u = urlparse(url)
        if u.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"the feature client speaks redis://, rediss:// or unix://, not {u.scheme}://")
        self.ssl = u.scheme == "rediss"
        self.unix = u.path if u.scheme == "unix" else None
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 6379
        self.db = int((u.path or "/0").lstrip("/") or 0) if u.scheme != "unix" else 0
        self.password = unquote(u.password) if u.password else None
        self.username = unquote(u.username) if u.username else None
        self.size = max(1, connections)
        self.conns: list[_Connection | None] = [None] * self.size
        self._opening: list[asyncio.Task | None] = [None] * self.size
        self.connects = 0
        self.wrong_type = 0   # keys that held another Redis type, read as absent

    async def _open(self, slot: int) -> _Connection:
        loop = asyncio.get_running_loop()
        if self.unix:
            _, conn = await loop.create_unix_connection(_Connection, self.unix)
        else:
            _, conn = await loop.create_connection(_Connection, self.host, self.port,
                                                   ssl=True if self.ssl else None)
        self.connects += 1
        setup = []
        if self.password:
            setup.append(_command(b"AUTH", *([self.username.encode()] if self.username else []),
                                  self.password.encode()))
        if self.db:
            setup.append(_command(b"SELECT", str(self.db).encode()))
        if setup:
            replies = await conn.send(b"".join(setup), len(setup))
            for r in replies:
                if isinstance(r, RespError):
                    conn.transport.close()  # type: ignore[union-attr]
                    raise ConnectionError(f"Redis refused the connection set-up: {r}")
        self.conns[slot] = conn
        return conn

    async def _connection(self) -> _Connection:
        # Fill connections in order: requests sharing a connection share its writes
        # (see `_flush`); another one is opened only when this one is busy.
        empty = -1
        for i, c in enumerate(self.conns):
            if c is None or c.closed:
                if empty < 0:
                    empty = i
            elif len(c.waiting) < BUSY and not c.timeouts:
                return c
        if empty < 0:  # all busy or suspect: the least suspect, then least loaded
            return min(self.conns, key=lambda c: (c.timeouts, len(c.waiting)))  # type: ignore[union-attr]
        task = self._opening[empty]
        if task is None or task.done():
            task = self._opening[empty] = asyncio.ensure_future(self._open(empty))
            # Its callers may all have timed out: the outcome is still retrieved (no
            # "exception never retrieved" noise while Redis is down).
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    async def read(self, user_key: str, topk_key: str) -> tuple[dict[bytes, bytes], bytes | None]:
        conn = await self._connection()
        payload = _command(b"HGETALL", user_key.encode()) + _command(b"GET", topk_key.encode())
        try:
            fields, topk = await conn.send(payload, 2)
        except asyncio.CancelledError:
            # The caller's budget passed without an answer. Our own loop may have been
            # late (the replies wait in the socket), so one timeout only makes the
            # connection suspect: new requests avoid it, and any reply clears it. After
            # SUSPECT_LIMIT timeouts without a reply Redis is stuck (paused, overloaded):
            # the connection is dropped rather than queue more behind it and parse a
            # backlog of late replies when Redis comes back.
            conn.timeouts += 1
            if conn.timeouts >= SUSPECT_LIMIT:
                conn.abort()
            raise
        # A key holding another type (WRONGTYPE) is this visitor's bad data, not a Redis
        # failure: read as absent, so it never counts against the breaker for everyone.
        if isinstance(fields, RespError):
            if not str(fields).startswith("WRONGTYPE"):
                raise fields
            self.wrong_type += 1
            fields = []
        if isinstance(topk, RespError):
            if not str(topk).startswith("WRONGTYPE"):
                raise topk
            self.wrong_type += 1
            topk = None
        it = iter(fields)
        return dict(zip(it, it)), topk

    async def close(self) -> None:
        for c in self.conns:
            if c is not None and c.transport is not None:
                c.transport.close()
        self.conns = [None] * self.size
