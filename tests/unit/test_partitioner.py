"""The native murmur2 is Kafka's default partitioner hash: the same partition as aiokafka's."""
from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import murmur2 as reference

from streams._native import murmur2


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 7, 8, 13, 36, 255])
def test_murmur2_equals_the_kafka_client_hash(length):
    rng = random.Random(length)
    for _ in range(50):
        key = bytes(rng.randrange(256) for _ in range(length))
        assert murmur2(key) == reference(key)

