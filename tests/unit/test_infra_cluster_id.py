"""The KRaft cluster id given to `kafka-storage format`: never read as an option."""
from __future__ import annotations

import base64
import uuid

from services.infra import new_cluster_id


def test_an_id_that_would_start_with_a_dash_is_drawn_again():
    dash = uuid.UUID(bytes=base64.urlsafe_b64decode("-" + "A" * 21 + "=="))
    drawn = iter([dash, dash, uuid.UUID(int=7)])
    cid = new_cluster_id(lambda: next(drawn))
    assert cid == base64.urlsafe_b64encode(uuid.UUID(int=7).bytes).decode().rstrip("=")
    assert next(drawn, None) is None  # both dashed draws were refused


def test_ids_are_22_url_safe_characters_and_differ():
    ids = {new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(c) == 22 and not c.startswith("-") for c in ids)
    assert all(set(c) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
               for c in ids)
