"""Kafka's default partitioner: the partition a producer's `send` picks for a key.

murmur2 of the key bytes, positive, modulo the partition count; the hash is the
native one (streams._native, tested against aiokafka's pure-Python murmur2, which
costs ~2 µs a key). Every writer that places records itself uses this one rule, so
a key lands where Kafka's own producers would put it."""
from __future__ import annotations

from streams._native import murmur2


def key_partition(key: bytes, count: int) -> int:
    """The partition of `key` among `count` partitions."""
    return (murmur2(key) & 0x7FFFFFFF) % count
