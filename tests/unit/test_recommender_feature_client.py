"""The feature client's connection: replies matched to waiting requests in order, whatever
the fragmentation; error replies, protocol errors and lost connections."""
from __future__ import annotations

import asyncio

import pytest

from services.recommender.feature_client import RespError, _command, _Connection


class Transport:
    """What the connection writes and whether it aborted (bytes only, no I/O)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True


def connection() -> tuple[_Connection, Transport]:
    conn, transport = _Connection(), Transport()
    conn.connection_made(transport)
    return conn, transport


HGETALL_AND_GET = b"*4\r\n$1\r\na\r\n$2\r\nbc\r\n$1\r\nb\r\n$4\r\nx\r\ny\r\n" + b"$3\r\ntop\r\n"


@pytest.mark.parametrize("step", [1, 2, 7, len(HGETALL_AND_GET)])
async def test_replies_reach_their_request_whatever_the_fragmentation(step):
    conn, _ = connection()
    fut = conn.send(b"ignored", 2)
    for i in range(0, len(HGETALL_AND_GET), step):
        assert not fut.done()
        conn.data_received(HGETALL_AND_GET[i:i + step])
    assert fut.result() == [[b"a", b"bc", b"b", b"x\r\ny"], b"top"]  # binary-safe values
    assert not conn.waiting


async def test_requests_sharing_a_connection_get_their_own_replies_in_order():
    conn, transport = connection()
    first, second = conn.send(b"one;", 2), conn.send(b"two;", 2)
    await asyncio.sleep(0)  # both leave in one write at the end of the loop turn
    assert transport.written == [b"one;two;"]
    conn.data_received(b"*0\r\n$-1\r\n*2\r\n$1\r\nk\r\n$1\r\nv\r\n")
    assert first.result() == [[], None]      # missing hash, missing key
    assert not second.done()
    conn.data_received(b"$2\r\nok\r\n")
    assert second.result() == [[b"k", b"v"], b"ok"]


async def test_a_cancelled_request_reply_is_read_and_dropped_in_order():
    conn, _ = connection()
    gone, kept = conn.send(b"", 1), conn.send(b"", 1)
    gone.cancel()
    conn.data_received(b"$4\r\nlate\r\n$4\r\nmine\r\n")
    assert kept.result() == [b"mine"]


async def test_error_reply_is_a_value_for_its_request_only():
    conn, _ = connection()
    fut = conn.send(b"", 2)
    conn.data_received(b"-WRONGTYPE not a hash\r\n$-1\r\n")
    error, nil = fut.result()
    assert isinstance(error, RespError) and "WRONGTYPE" in str(error) and nil is None
    assert not conn.closed


async def test_unreadable_reply_fails_every_waiting_request_and_aborts():
    conn, transport = connection()
    a, b = conn.send(b"", 1), conn.send(b"", 1)
    conn.data_received(b"?what\r\n")
    for fut in (a, b):
        with pytest.raises(ConnectionError, match="unreadable reply"):
            fut.result()
    assert transport.aborted and conn.closed


async def test_lost_connection_fails_waiting_requests():
    conn, _ = connection()
    fut = conn.send(b"", 2)
    conn.data_received(b"*0\r\n")   # half of its replies
    conn.connection_lost(None)
    with pytest.raises(ConnectionError, match="lost"):
        fut.result()


def test_command_encoding():
    assert _command(b"GET", b"k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
