"""The feature client's RESP2 reply parser: complete, incomplete and error replies."""
from __future__ import annotations

import pytest

from services.recommender.feature_client import RespError, _command, parse_reply


@pytest.mark.parametrize("raw,value,why", [
    (b"$3\r\nabc\r\n", b"abc", "bulk string"),
    (b"$0\r\n\r\n", b"", "empty bulk string"),
    (b"$-1\r\n", None, "nil (GET of a missing key)"),
    (b"*0\r\n", [], "empty array (HGETALL of a missing key)"),
    (b"*2\r\n$1\r\na\r\n$2\r\nbc\r\n", [b"a", b"bc"], "array of bulk strings"),
    (b"*2\r\n*1\r\n:5\r\n+OK\r\n", [[5], b"OK"], "nested, integer, simple string"),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb", "binary-safe: CRLF inside a bulk string"),
])
def test_complete_replies(raw, value, why):
    assert parse_reply(raw, 0) == (value, len(raw)), why


@pytest.mark.parametrize("raw", [b"", b"$3\r\nab", b"*2\r\n$1\r\na\r\n", b"$3", b"*2\r\n$1\r\na\r\n$2\r\nb"])
def test_incomplete_replies_wait_for_more(raw):
    assert parse_reply(raw, 0) is None


def test_error_reply_and_offsets():
    buf = b"+OK\r\n-WRONGTYPE not a hash\r\n"
    value, pos = parse_reply(buf, 5)
    assert isinstance(value, RespError) and "WRONGTYPE" in str(value) and pos == len(buf)


def test_unknown_reply_type():
    with pytest.raises(RespError):
        parse_reply(b"?what\r\n", 0)


def test_command_encoding():
    assert _command(b"GET", b"k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
