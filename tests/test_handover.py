"""A request's tracker used after the middleware handed it over (issue 11, items 7 and 8).

A kept reference, a thread or an asyncio task started by the handler may record after the
response: each such call is delivered as a follow-up batch under the same visitor, or, when
that is impossible (the client was shut down), counted and logged. Real Flask and Starlette
apps, the local collector as Koala.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings
from typing import Any

import pytest
from flask import Flask
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from koala_middleware import KoalaClient, Tracker, _tracker
from koala_middleware._tracker import MAX_ITEMS_PER_TRACKER, TRACKER_FULL_DETAIL
from koala_middleware.asgi import KoalaASGIMiddleware
from koala_middleware.flask import Koala
from koala_middleware.testing import Collector
from koala_middleware.wsgi import KoalaWSGIMiddleware

UA = "Mozilla/5.0 koala-handover-test"
VISITOR = "0b6f3c1e-2d4a-4f5b-8c7d-9e0f1a2b3c4d"
COOKIE = f"ko_id={VISITOR}; ko_id_server={VISITOR}"


def flask_app(client: KoalaClient, kept: list[Tracker], go: threading.Event, threads: list[threading.Thread]) -> Flask:
    app = Flask(__name__)
    Koala(app, client=client)

    @app.get("/keep")
    def keep() -> str:
        flask_request.koala.track("In Request")  # type: ignore[attr-defined]
        kept.append(flask_request.koala)  # type: ignore[attr-defined]
        return "kept"

    @app.get("/thread")
    def thread() -> str:
        tracker = flask_request.koala  # type: ignore[attr-defined]

        def later() -> None:
            go.wait(10)
            tracker.track("From Thread")

        threads.append(threading.Thread(target=later))
        threads[-1].start()
        return "started"

    @app.get("/race")
    def race() -> str:
        tracker = flask_request.koala  # type: ignore[attr-defined]

        def many() -> None:
            for n in range(300):
                tracker.track("Raced", {"n": n})

        threads.append(threading.Thread(target=many))
        threads[-1].start()  # records while the response goes out and the tracker is handed over
        return "racing"

    return app


def test_flask_a_kept_reference_and_a_thread_deliver_follow_up_batches(
    client: KoalaClient, collector: Collector
) -> None:
    kept: list[Tracker] = []
    go = threading.Event()
    threads: list[threading.Thread] = []
    browser = flask_app(client, kept, go, threads).test_client(use_cookies=False)
    headers = {"User-Agent": UA, "Cookie": COOKIE}
    assert browser.get("/keep", headers=headers, buffered=True).text == "kept"
    assert browser.get("/thread", headers=headers, buffered=True).text == "started"
    assert client.flush(5) and client.stats.enqueued == 1  # the /keep request's own batch

    kept[0].track("After Response")  # a kept reference, used later
    go.set()  # the thread records now, after its response
    threads[0].join(10)
    assert client.flush(5)
    events = {e["event"]: b for b in collector.batches() for e in b["events"]}
    assert set(events) == {"In Request", "After Response", "From Thread"}
    assert {b["profile_id"] for b in events.values()} == {VISITOR}
    # The kept tracker read the visitor's User-Agent during its request, so it stays with it.
    assert {r.headers["user-agent"] for r in collector.requests("/batch")} >= {UA}


def test_records_racing_the_hand_over_are_each_delivered_once(client: KoalaClient, collector: Collector) -> None:
    threads: list[threading.Thread] = []
    browser = flask_app(client, [], threading.Event(), threads).test_client(use_cookies=False)
    assert browser.get("/race", headers={"Cookie": COOKIE}, buffered=True).text == "racing"
    threads[0].join(10)
    assert client.flush(10)
    received = sorted(e["properties"]["n"] for e in collector.events())
    assert received == list(range(300))  # none lost, none twice
    assert client.stats.dropped == {}


def test_starlette_an_asyncio_task_started_by_the_handler_delivers_a_follow_up_batch(
    client: KoalaClient, collector: Collector
) -> None:
    tasks: list[asyncio.Task[None]] = []

    async def later(tracker: Tracker) -> None:
        await asyncio.sleep(0.2)  # the response is out by then
        tracker.track("From Task")

    async def page(request: Request) -> PlainTextResponse:
        request.state.koala.identify("ada@acme.com")
        tasks.append(asyncio.get_running_loop().create_task(later(request.state.koala)))
        return PlainTextResponse("ok")

    app = KoalaASGIMiddleware(Starlette(routes=[Route("/", page)]), client=client)
    with TestClient(app, client=("203.0.113.9", 50000)) as browser:  # not "testclient": a real IP
        assert browser.get("/", headers={"cookie": COOKIE, "user-agent": UA}).text == "ok"
        assert client.stats.enqueued == 1  # handed over with the response; the task still waits
        assert collector.wait_for(2)
    bodies = collector.batches()
    assert [sorted(b) for b in bodies] == [
        ["email", "identifies", "ip", "profile_id"],
        ["email", "events", "ip", "profile_id"],
    ]
    (follow_up,) = [b for b in bodies if "events" in b]
    assert follow_up["events"][0]["event"] == "From Task"
    assert (follow_up["profile_id"], follow_up["email"]) == (VISITOR, "ada@acme.com")


def test_a_late_record_that_cannot_be_delivered_is_counted_and_logged(
    collector: Collector, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_tracker, "_logged_follow_up", False)
    client = KoalaClient("pk_test", api_url=collector.url)
    kept: list[Tracker] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        kept.append(environ["koala.tracker"])
        start_response("200 OK", [])
        return [b"ok"]

    body = KoalaWSGIMiddleware(app, client=client)({"PATH_INFO": "/", "HTTP_COOKIE": COOKIE}, lambda *a: None)
    body.close()  # type: ignore[attr-defined]
    client.shutdown(2)
    with caplog.at_level(logging.DEBUG, logger="koala_middleware"):
        kept[0].track("After Shutdown")
    assert client.stats.dropped == {"shutdown": 1} and client.stats.events_dropped == {"shutdown": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert any("shutdown" in m and "dropped 1 batch" in m for m in messages)
    assert any("follow-up batch" in m for m in messages)


# -- issue 11 item 8: the tracker's and visit's smaller faults ----------------------------------


def test_account_calls_count_against_the_per_tracker_cap(caplog: pytest.LogCaptureFixture) -> None:
    client = KoalaClient(dry_run=True)
    tracker = client.tracker(profile_id=VISITOR)
    with caplog.at_level(logging.WARNING, logger="koala_middleware"):
        for n in range(MAX_ITEMS_PER_TRACKER + 5):
            tracker.account(f"company{n}.com", link=False, traits={"n": n})
    assert len(tracker._accounts or {}) == MAX_ITEMS_PER_TRACKER  # memory stays bounded
    assert client.stats.events_dropped == {"tracker_full": 5}
    (warning,) = [r.getMessage() for r in caplog.records if "tracker_full" in r.getMessage()]
    assert TRACKER_FULL_DETAIL in warning  # the detail says what and how
    tracker.send()
    tracker.account("again.com", {"plan": "pro"})  # a fresh start after the hand-over
    assert client.stats.events_dropped == {"tracker_full": 5}


def test_a_path_above_latin_1_with_exclude_paths_does_not_raise(client: KoalaClient, collector: Collector) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["koala.tracker"].track("Read Article")
        start_response("200 OK", [])
        return [b"ok"]

    mw = KoalaWSGIMiddleware(app, client=client, exclude_paths=["/static"])
    for path in ("/статья", "/static/日本.css", "/caf\u00c3\u00a9"):  # decoded text, and PEP 3333's latin-1
        body = mw({"PATH_INFO": path, "HTTP_COOKIE": COOKIE}, lambda *a: None)
        assert b"".join(body) == b"ok"
        body.close()  # type: ignore[attr-defined]
    assert client.flush(5)
    assert len(collector.events()) == 2  # the article and the café; the stylesheet is excluded


class ItemsRaise(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        raise RuntimeError("items() is broken")


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr() is broken")

    def __hash__(self) -> int:
        return 1


@pytest.mark.parametrize(
    "properties",
    [ItemsRaise(a=1), {BadRepr(): 1}, {"nested": {BadRepr(): 1}}, {"nested": ItemsRaise(b=2)}],
    ids=["items-raises", "key-repr-raises", "nested-key-repr-raises", "nested-items-raises"],
)
def test_odd_mappings_give_the_documented_type_error(properties: Any) -> None:
    tracker = KoalaClient(dry_run=True).tracker(profile_id=VISITOR)
    with pytest.raises(TypeError, match="cannot be sent as JSON"):
        tracker.track("Odd", properties)
    with pytest.raises(TypeError, match="cannot be sent as JSON"):
        tracker.identify(traits=properties)
    assert tracker.batches() == []


def _request_tracker(client: KoalaClient, scope_client: Any = ("203.0.113.7", 51000)) -> _tracker.RequestTracker:
    """A returning visitor's request tracker, as the ASGI middleware starts it."""
    middleware = KoalaASGIMiddleware(lambda scope, receive, send: None, client=client)  # type: ignore[arg-type,return-value]
    scope = {
        "type": "http",
        "headers": [(b"user-agent", UA.encode()), (b"cookie", COOKIE.encode())],
        "client": scope_client,
    }
    tracker = middleware.visits.start(scope, COOKIE.encode(), False)
    assert not tracker.new_visitor and tracker.enabled
    return tracker


@pytest.mark.parametrize("send_ip", [True, False])
@pytest.mark.parametrize("email", [None, "ada@example.com"])
@pytest.mark.parametrize(("events", "identifies"), [(1, 1), (2, 0), (0, 1), (31, 45)])
def test_the_usual_hand_over_builds_what_build_builds(
    monkeypatch: pytest.MonkeyPatch, send_ip: bool, email: str | None, events: int, identifies: int
) -> None:
    """RequestTracker._take's shortcut (the usual hand-over) and Tracker._build agree: the
    same bodies (split at 30 items of a kind), User-Agent, path and event count."""
    client = KoalaClient(dry_run=True, send_ip=send_ip)
    tracker = _request_tracker(client)
    for n in range(identifies):
        tracker.identify(email if n == 0 else None, {"n": n})
    for n in range(events):
        tracker.track("Viewed", {"n": n}, message_id=f"m-{n}")
    expected = tracker.batches()  # through _build, which reads the User-Agent and IP
    tracker._user_agent = tracker._ip = _tracker._UNREAD  # unread again, as at a hand-over
    monkeypatch.setattr(_tracker.Tracker, "_build", None)  # the shortcut must not need it
    taken = tracker._take()
    monkeypatch.undo()
    assert [(b.path, b.body, b.user_agent, b.event_count) for b in taken] == [
        (b.path, b.body, b.user_agent, b.event_count) for b in expected
    ]
    assert taken and all(b.user_agent == UA for b in taken)
    assert ('"ip":"203.0.113.7"' in taken[0].body.decode()) is send_ip
    assert tracker.user_agent == UA and tracker.ip == "203.0.113.7"  # read once, kept for follow-ups
    assert not tracker.has_records and tracker._take() == []


def test_the_usual_hand_over_keeps_the_visitor_for_follow_ups(dry: KoalaClient) -> None:
    """Read at the hand-over while the request is held: a follow-up after the request was let
    go of still carries the visitor's User-Agent and IP; an odd client address is no IP."""
    tracker = _request_tracker(dry, scope_client=("testclient", 50000))
    tracker.track("In Request")
    tracker.finish()
    tracker.track("Later")  # a follow-up batch
    first, follow_up = dry.dry_run_batches
    assert first.user_agent == follow_up.user_agent == UA
    assert '"ip"' not in first.body.decode() and '"ip"' not in follow_up.body.decode()
    assert [e["event"] for b in (first, follow_up) for e in b.json()["events"]] == ["In Request", "Later"]


def test_a_hand_over_with_accounts_or_a_reset_goes_through_build(dry: KoalaClient) -> None:
    tracker = _request_tracker(dry)
    tracker.identify("ada@example.com")
    tracker.account("example.com", {"plan": "pro"}).track("Upgraded")
    tracker.reset()
    tracker.track("After Reset")
    tracker.start_response(200, lambda: None)  # the new id's cookie goes out
    tracker.finish()
    paths = sorted(batch.path for batch in dry.dry_run_batches)
    assert paths == ["/accounts/batch", "/batch", "/batch"]
    assert all(batch.user_agent == UA for batch in dry.dry_run_batches)
