"""_encoding: the shared C JSON encoder (and its pure-Python fallback) and sent_at stamps."""

from __future__ import annotations

import datetime
import decimal
import json
import re
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from koala_middleware import _encoding
from koala_middleware._encoding import dumps, format_sent_at, quote

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@pytest.fixture(params=["C encoder", "fallback"])
def encoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both paths: the C encoder built once, and the plain JSONEncoder where C is missing."""
    if request.param == "fallback":
        monkeypatch.setattr(_encoding, "_c_encoder", None)
    return str(request.param)


@given(value=JSON_VALUES)
def test_dumps_is_compact_json_on_both_paths(value: Any) -> None:
    expected = json.dumps(value, separators=(",", ":"), allow_nan=False)
    assert dumps(value) == expected
    saved = _encoding._c_encoder
    _encoding._c_encoder = None  # the fallback (hypothesis does not mix with function fixtures)
    try:
        assert dumps(value) == expected
    finally:
        _encoding._c_encoder = saved


def test_rich_values_are_converted_on_both_paths(encoder: str) -> None:
    value = {
        "at": datetime.datetime(2026, 1, 2, 3, 4, 5),
        "day": datetime.date(2026, 1, 2),
        "id": uuid.UUID(int=1),
        "whole": decimal.Decimal("3"),
        "part": decimal.Decimal("2.5"),
        "tags": frozenset({"a"}),
    }
    assert json.loads(dumps(value)) == {
        "at": "2026-01-02T03:04:05+00:00",  # naive datetimes are taken as UTC
        "day": "2026-01-02",
        "id": "00000000-0000-0000-0000-000000000001",
        "whole": 3,
        "part": 2.5,
        "tags": ["a"],
    }


def test_what_json_cannot_carry_raises_on_both_paths(encoder: str) -> None:
    for bad in ({"x": object()}, {"x": float("nan")}, {"x": decimal.Decimal("NaN")}):
        with pytest.raises((TypeError, ValueError)):
            dumps(bad)
    circular: dict[str, Any] = {}
    circular["self"] = circular
    with pytest.raises((RecursionError, ValueError)):  # C: RecursionError; fallback: ValueError
        dumps(circular)


def test_quote_is_a_json_string() -> None:
    assert quote('a"b\u00e9') == json.dumps('a"b\u00e9')


def test_sent_at_is_utc_with_milliseconds_and_z() -> None:
    assert format_sent_at(datetime.datetime(2026, 1, 2, 3, 4, 5, 678_901)) == "2026-01-02T03:04:05.678Z"
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    assert format_sent_at(datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=plus_two)) == "2026-01-02T01:04:05.000Z"
    now = format_sent_at(None)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", now)
    parsed = datetime.datetime.strptime(now, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - parsed).total_seconds()) < 5
    with pytest.raises(TypeError, match="sent_at must be a datetime"):
        format_sent_at("2026-01-02")  # type: ignore[arg-type]


def test_sent_at_for_now_follows_the_clock_across_milliseconds_and_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memo of the last millisecond and second never returns a stale stamp."""
    clock = iter([1_767_225_599.9991, 1_767_225_599.9995, 1_767_225_600.0001, 1_767_225_600.0012])
    monkeypatch.setattr(_encoding.time, "time", lambda: next(clock))
    stamps = [format_sent_at(None) for _ in range(4)]
    assert stamps == [
        "2025-12-31T23:59:59.999Z",
        "2025-12-31T23:59:59.999Z",
        "2026-01-01T00:00:00.000Z",
        "2026-01-01T00:00:00.001Z",
    ]
