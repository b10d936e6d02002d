"""Call-site validation: developer mistakes fail where they are made, with a fix in the message."""

from __future__ import annotations

import datetime
import decimal
import json
import re
import uuid

import pytest

from koala_middleware import KoalaClient, Tracker, current_tracker
from koala_middleware._tracker import MAX_ITEMS_PER_TRACKER


@pytest.fixture
def tracker() -> Tracker:
    client = KoalaClient(dry_run=True)
    return client.tracker(profile_id=str(uuid.uuid4()))


def recorded_events(tracker: Tracker) -> list[dict]:
    return [e for b in tracker.batches() for e in b.json().get("events", [])]


@pytest.mark.parametrize(
    ("event", "error", "words"),
    [
        (42, TypeError, "event name must be a str, got int"),
        (None, TypeError, "got NoneType"),
        ("", ValueError, "must not be empty"),
        ("   ", ValueError, "must not be empty"),
        ("x" * 256, ValueError, "over the limit of 255"),
    ],
)
def test_bad_event_names(tracker: Tracker, event: object, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        tracker.track(event)  # type: ignore[arg-type]
    assert tracker.batches() == []


def test_unserialisable_property_is_named_with_its_path(tracker: Tracker) -> None:
    with pytest.raises(TypeError) as info:
        tracker.track("Paid", {"order": {"items": [1, object()]}})
    message = str(info.value)
    assert "properties['order']['items'][1]" in message
    assert "object" in message and "cannot be sent as JSON" in message


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"amount": float("nan")}, "properties['amount']"),
        ({"blob": b"bytes"}, "properties['blob']"),
        ({(1, 2): "tuple key"}, "properties[(1, 2)]"),
        ({"d": decimal.Decimal("Infinity")}, "properties['d']"),
    ],
)
def test_values_json_cannot_carry(tracker: Tracker, bad: dict, where: str) -> None:
    with pytest.raises(TypeError, match=re.escape(where)):
        tracker.track("Paid", bad)


def test_a_value_that_contains_itself_is_named_as_circular(tracker: Tracker) -> None:
    loop: dict = {"plan": "pro"}
    loop["self"] = loop
    with pytest.raises(ValueError, match=r"properties contains itself \(a circular reference\)"):
        tracker.track("Paid", {"nested": [loop]})
    tracker.track("Paid", {"same": loop["plan"], "twice": [loop["plan"], loop["plan"]]})  # shared, not circular
    assert tracker._count == 1


def test_properties_must_be_a_mapping(tracker: Tracker) -> None:
    with pytest.raises(TypeError, match="properties must be a dict, got list"):
        tracker.track("Paid", ["not", "a", "dict"])  # type: ignore[arg-type]


def test_rich_values_are_encoded_sensibly(tracker: Tracker) -> None:
    the_id = uuid.uuid4()
    tracker.track(
        "Paid",
        {
            "at": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
            "naive": datetime.datetime(2024, 1, 2, 3, 4, 5),
            "day": datetime.date(2024, 1, 2),
            "id": the_id,
            "price": decimal.Decimal("19.99"),
            "count": decimal.Decimal("3"),
            "tags": ("a", "b"),
        },
    )
    [event] = recorded_events(tracker)
    assert event["properties"] == {
        "at": "2024-01-02T03:04:05+00:00",
        "naive": "2024-01-02T03:04:05+00:00",
        "day": "2024-01-02",
        "id": str(the_id),
        "price": 19.99,
        "count": 3,
        "tags": ["a", "b"],
    }


def test_properties_are_snapshotted_at_the_call(tracker: Tracker) -> None:
    props = {"step": 1}
    tracker.track("Step", props)
    props["step"] = 2
    assert recorded_events(tracker)[0]["properties"] == {"step": 1}


def test_oversized_properties_are_refused(tracker: Tracker) -> None:
    with pytest.raises(ValueError, match="over the 32768-byte limit"):
        tracker.track("Upload", {"data": "x" * 40_000})


@pytest.mark.parametrize("email", ["not-an-email", "a@b", "a b@example.com", "@example.com", ""])
def test_invalid_email(tracker: Tracker, email: str) -> None:
    with pytest.raises(ValueError, match="does not look like an email address"):
        tracker.identify(email)
    assert tracker.email is None


def test_email_must_be_a_string(tracker: Tracker) -> None:
    with pytest.raises(TypeError, match="email must be a str"):
        tracker.identify(123)  # type: ignore[arg-type]


def test_identify_sets_email_for_later_batches(tracker: Tracker) -> None:
    tracker.identify(" ada@example.com ", {"plan": "pro"})
    assert tracker.email == "ada@example.com"
    [batch] = tracker.batches()
    body = batch.json()
    assert body["email"] == "ada@example.com"
    assert body["identifies"][0]["traits"] == {"plan": "pro", "email": "ada@example.com"}


@pytest.mark.parametrize("domain", ["https://acme.com", "acme.com/path", "ada@acme.com", "acme", "", "acme.com:443"])
def test_account_domain_must_be_a_bare_domain(tracker: Tracker, domain: str) -> None:
    with pytest.raises(ValueError, match="not a bare domain name"):
        tracker.account(domain)


def test_account_domain_type(tracker: Tracker) -> None:
    with pytest.raises(TypeError, match="account domain must be a str"):
        tracker.account(None)  # type: ignore[arg-type]


def test_client_tracker_needs_an_identity() -> None:
    client = KoalaClient(dry_run=True)
    with pytest.raises(ValueError, match=r"needs a profile_id .* or an email"):
        client.tracker()


def test_disabled_tracker_validates_but_records_nothing() -> None:
    client = KoalaClient(dry_run=True)
    tracker = Tracker(client, str(uuid.uuid4()), user_agent="UA", ip="127.0.0.1", enabled=False)
    with pytest.raises(TypeError):
        tracker.track(1)  # type: ignore[arg-type]
    tracker.track("Opted Out Visit")
    tracker.identify("ada@example.com")
    tracker.account("acme.com", {"plan": "pro"})
    assert tracker.batches() == []
    assert tracker.email is None


def test_items_past_the_per_tracker_limit_are_counted_not_silent(tracker: Tracker) -> None:
    for _ in range(MAX_ITEMS_PER_TRACKER + 3):
        tracker.track("Loop")
    assert sum(len(b.json().get("events", [])) for b in tracker.batches()) == MAX_ITEMS_PER_TRACKER
    assert tracker._client.stats.events_dropped == {"tracker_full": 3}


def test_current_tracker_is_none_outside_a_request() -> None:
    assert current_tracker() is None


def test_dry_run_keeps_and_logs_what_it_would_send(caplog: pytest.LogCaptureFixture) -> None:
    client = KoalaClient(dry_run=True)
    caplog.set_level("INFO", logger="koala_middleware")
    with client.tracker(email="ada@example.com") as tracker:
        tracker.track("Signed Up")
    [batch] = client.dry_run_batches
    assert batch.path == "/batch" and batch.json()["events"][0]["event"] == "Signed Up"
    assert any("would POST /batch" in r.getMessage() and "Signed Up" in r.getMessage() for r in caplog.records)
    assert client.stats.dry_run == 1 and client.stats.enqueued == 0
    assert json.loads(batch.body)["email"] == "ada@example.com"
