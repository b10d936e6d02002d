"""The Koala wire format, checked on what a real local collector receives."""

from __future__ import annotations

import datetime
import re
import uuid

from koala_middleware import Batch, KoalaClient, Tracker, __version__
from koala_middleware.testing import Collector

SENT_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def is_uuid4(value: str) -> bool:
    return str(uuid.UUID(value)) == value and uuid.UUID(value).version == 4


def test_visitor_batch_body_and_headers(client: KoalaClient, collector: Collector) -> None:
    profile_id = str(uuid.uuid4())
    tracker = client.tracker(profile_id=profile_id, user_agent="Mozilla/5.0 (Test)")
    tracker.identify("ada@example.com", {"plan": "pro"})
    message_id = tracker.track("Signed Up", {"source": "ads"})
    tracker.send()
    assert client.flush(5)

    [request] = collector.requests()
    assert request.method == "POST"
    assert request.path == "/web/projects/pk_test/batch"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "Mozilla/5.0 (Test)"
    body = request.json()
    assert set(body) == {"profile_id", "email", "events", "identifies"}
    assert body["profile_id"] == profile_id
    assert body["email"] == "ada@example.com"
    [identify] = body["identifies"]
    assert set(identify) == {"type", "sent_at", "traits"}
    assert identify["type"] == "identify"
    assert SENT_AT.match(identify["sent_at"])
    assert identify["traits"] == {"plan": "pro", "email": "ada@example.com"}
    [event] = body["events"]
    assert set(event) == {"message_id", "type", "event", "properties", "sent_at"}
    assert event["type"] == "track"
    assert event["event"] == "Signed Up"
    assert event["properties"] == {"source": "ads"}
    assert event["message_id"] == message_id and is_uuid4(message_id)
    assert SENT_AT.match(event["sent_at"])


def test_library_user_agent_outside_a_request(client: KoalaClient, collector: Collector) -> None:
    with client.tracker(email="ada@example.com") as tracker:
        tracker.track("Invoice Paid")
    assert client.flush(5)
    [request] = collector.requests()
    assert request.headers["user-agent"] == f"koala-middleware/{__version__}"
    assert request.json()["email"] == "ada@example.com"
    assert "profile_id" not in request.json()


def test_more_than_30_of_a_type_is_split_and_nothing_lost(client: KoalaClient, collector: Collector) -> None:
    tracker = client.tracker(profile_id=str(uuid.uuid4()))
    ids = [tracker.track("Clicked", {"n": n}) for n in range(65)]
    for n in range(31):
        tracker.identify(traits={"n": n})
    tracker.send()
    assert client.flush(5)

    bodies = [r.json() for r in collector.requests("/batch")]
    assert len(bodies) == 3
    assert sorted(len(b.get("events", [])) for b in bodies) == [5, 30, 30]
    assert sorted(len(b.get("identifies", [])) for b in bodies) == [0, 1, 30]
    for body in bodies:
        assert body["profile_id"] == tracker.profile_id
        assert len(body.get("events", [])) <= 30 and len(body.get("identifies", [])) <= 30
    received = [e["message_id"] for b in bodies for e in b.get("events", [])]
    assert sorted(received) == sorted(ids)
    assert len(set(received)) == 65 and all(is_uuid4(i) for i in received)
    assert sorted(e["properties"]["n"] for b in bodies for e in b.get("events", [])) == list(range(65))


def test_account_traits_and_events_go_to_the_account_endpoint(client: KoalaClient, collector: Collector) -> None:
    with client.tracker(email="ada@example.com") as tracker:
        acme = tracker.account("Acme.com", {"plan": "enterprise"}, group_id="dev-team")
        tracker.account("acme.com", {"plan": "free"}, group_id="marketing")
        message_id = acme.track("Workspace Created", {"workspace_id": "1234"})
    assert client.flush(5)

    # The person is linked to the company once per account() call, as the browser SDK does it.
    [person] = collector.requests("/web/projects/pk_test/batch")
    assert [i["traits"] for i in person.json()["identifies"]] == [
        {"$account": {"domain": "acme.com", "group_id": "dev-team", "plan": "enterprise"}, "email": "ada@example.com"},
        {"$account": {"domain": "acme.com", "group_id": "marketing", "plan": "free"}, "email": "ada@example.com"},
    ]
    [request] = collector.requests("/web/projects/pk_test/accounts/batch")
    body = request.json()
    assert set(body) == {"domain", "identifies", "events"}
    assert body["domain"] == "acme.com"
    assert body["identifies"] == [
        {"type": "identify", "traits": {"plan": "enterprise", "group_id": "dev-team"}},
        {"type": "identify", "traits": {"plan": "free", "group_id": "marketing"}},
    ]
    [event] = body["events"]
    assert event["message_id"] == message_id and event["type"] == "track"
    assert event["event"] == "Workspace Created" and event["properties"] == {"workspace_id": "1234"}
    assert request.headers["user-agent"].startswith("koala-middleware/")


def test_caller_message_id_and_sent_at_are_kept(client: KoalaClient, collector: Collector) -> None:
    when = datetime.datetime(2022, 11, 9, 23, 57, 14, 776000, tzinfo=datetime.timezone.utc)
    with client.tracker(profile_id="3e6a2c18-3b02-40c4-b8d2-1842c193d3ba") as tracker:
        tracker.track("Created Account", message_id="order-42", sent_at=when)
    assert client.flush(5)
    [event] = collector.events()
    assert event["message_id"] == "order-42"
    assert event["sent_at"] == "2022-11-09T23:57:14.776Z"


def test_ip_is_sent_when_known_and_can_be_turned_off(collector: Collector) -> None:
    for send_ip, expected in ((True, "203.0.113.9"), (False, None)):
        client = KoalaClient("pk_test", api_url=collector.url, send_ip=send_ip)
        tracker = Tracker(client, str(uuid.uuid4()), user_agent="UA", ip="203.0.113.9")
        tracker.track("Viewed Pricing")
        tracker.send()
        assert client.flush(5)
        client.shutdown(1)
        assert collector.batches()[-1].get("ip") == expected


def test_nothing_recorded_sends_nothing(client: KoalaClient, collector: Collector) -> None:
    with client.tracker(email="ada@example.com"):
        pass
    assert client.flush(5)
    assert collector.received == [] and client.stats.enqueued == 0


def test_a_batch_s_message_ids_are_read_from_its_body_in_order() -> None:
    """A built batch keeps no tuple of ids (memory per queued batch): they come from the
    body, the caller's own ids included, split batches each with their own."""
    client = KoalaClient("pk_test", dry_run=True)
    tracker = client.tracker(profile_id=str(uuid.uuid4()))
    sent = [tracker.track("Viewed", message_id=f"order-{n}") if n % 2 else tracker.track("Viewed") for n in range(45)]
    tracker.identify("ada@example.com")
    first, second = tracker.batches()
    assert first.message_ids == tuple(sent[:30]) and first.event_count == 30
    assert second.message_ids == tuple(sent[30:]) and second.event_count == 15
    only_identify = client.tracker(email="ada@example.com")
    only_identify.identify(traits={"message_id": "not an event"})
    (batch,) = only_identify.batches()
    assert batch.message_ids == () and batch.event_count == 0
    client.shutdown(0)


def test_a_batch_made_by_hand_counts_the_events_of_its_body_or_takes_the_ids_given() -> None:
    body = b'{"profile_id":"p","events":[{"message_id":"a","type":"track"},{"message_id":"b","type":"track"}]}'
    assert Batch("/batch", body, "UA").message_ids == ("a", "b")
    assert Batch("/batch", body, "UA").event_count == 2
    assert Batch("/batch", body, "UA", ("x",)).message_ids == ("x",)
    assert Batch("/batch", b"not json", "UA").message_ids == ()
