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


def test_every_random_digit_varies_and_the_variant_digit_takes_all_four_values() -> None:
    """The ids are formatted column by column: no column may end up fixed or shifted."""
    ids = [random_uuid4() for _ in range(1000)]
    fixed = {8: "-", 13: "-", 14: "4", 18: "-", 23: "-"}
    for place in range(36):
        seen = {value[place] for value in ids}
        if place in fixed:
            assert seen == {fixed[place]}
        elif place == 19:
            assert seen == set("89ab")
        else:
            assert seen == set("0123456789abcdef"), place
