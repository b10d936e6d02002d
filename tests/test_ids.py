"""_ids: random UUID v4s, read ahead in batches, never shared with a forked child."""

from __future__ import annotations

import uuid

from koala_middleware._ids import random_uuid4


def test_ids_are_canonical_random_uuid4s_and_fresh() -> None:
    ids = [random_uuid4() for _ in range(1000)]  # several read-ahead batches
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert str(parsed) == value and parsed.version == 4 and parsed.variant == uuid.RFC_4122
