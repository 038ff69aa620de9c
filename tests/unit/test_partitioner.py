"""The native murmur2 is Kafka's default partitioner hash: the same partition as aiokafka's."""
from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as reference

from streams._native import murmur2
from streams.partitioning import key_partition


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 7, 8, 13, 36, 255])
def test_murmur2_equals_the_kafka_client_hash(length):
    rng = random.Random(length)
    for _ in range(50):
        key = bytes(rng.randrange(256) for _ in range(length))
        assert murmur2(key) == reference(key)


@pytest.mark.parametrize("count", [1, 3, 4, 12])
def test_key_partition_is_the_partition_kafkas_producer_picks(count):
    rng, partitions = random.Random(count), list(range(count))
    for _ in range(200):
        key = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        assert key_partition(key, count) == DefaultPartitioner()(key, partitions, partitions)
