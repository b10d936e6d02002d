"""A request's hand-over is an append: the sender's thread builds its batches (issue 22).

The middleware reads the visitor's User-Agent and IP, lets go of the request and queues the
tracker unbuilt; the sender's thread builds the batches and admits them under the queue's
bounds. What users see must not change: the same
batches, counted at once, every refusal counted and logged, nothing waiting forever. A real
Starlette app called as a server calls it, the local collector as Koala.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from helpers import FAST_RETRIES
from koala_middleware import KoalaClient
from koala_middleware._delivery import _worker
from koala_middleware._delivery._native import SenderThread
from koala_middleware._tracker import RequestTracker
from koala_middleware.asgi import KoalaASGIMiddleware
from koala_middleware.testing import Collector

UA = "Mozilla/5.0 koala-unbuilt-test"
VISITOR = "0b6f3c1e-2d4a-4f5b-8c7d-9e0f1a2b3c4d"
COOKIE = f"ko_id={VISITOR}; ko_id_server={VISITOR}".encode()

Call = Callable[..., RequestTracker]


def starlette_calls(client: KoalaClient) -> Call:
    """``call(ip, scopes)``: one request to a Starlette app that tracks an event; its
    tracker (and its scope appended to ``scopes``)."""

    async def tracked(request: Request) -> PlainTextResponse:
        request.state.koala.track("Viewed Pricing", {"plan": "pro"})
        return PlainTextResponse("ok")

    app = KoalaASGIMiddleware(Starlette(routes=[Route("/", tracked)]), client=client)
    loop = asyncio.new_event_loop()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    def call(ip: str = "203.0.113.7", scopes: list[dict[str, Any]] | None = None) -> RequestTracker:
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "https",
            "path": "/",
            "raw_path": b"/",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"example.com"), (b"cookie", COOKIE), (b"user-agent", UA.encode())],
            "client": (ip, 50000),
            "server": ("example.com", 443),
        }
        loop.run_until_complete(app(scope, receive, send))
        if scopes is not None:
            scopes.append(scope)
        tracker: RequestTracker = scope["koala.tracker"]
        return tracker

    return call


def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_the_batch_built_later_carries_what_the_request_said_even_if_the_server_reuses_it(
    collector: Collector,
) -> None:
    collector.hang()  # the first batch stays in flight: the next hand-overs wait unbuilt
    client = KoalaClient("pk_test", api_url=collector.url, max_in_flight=1, **FAST_RETRIES)
    try:
        call = starlette_calls(client)
        call("203.0.113.1")
        assert wait_until(lambda: len(collector.requests("/batch", accepted_only=False)) == 1)
        call("203.0.113.2")  # wakes the idle sender: built, then waiting for its turn
        queue = client._sender._queue  # type: ignore[union-attr]
        assert wait_until(lambda: not queue.unbuilt and len(queue.waiting) == 1)
        time.sleep(0.05)  # the sender's loop asleep until an attempt ends
        scopes: list[dict[str, Any]] = []
        later = call("203.0.113.3", scopes)
        assert len(queue.unbuilt) == 1  # not built yet
        assert client.stats.enqueued == 3  # counted at the hand-over, built or not
        assert later._request is None  # let go of at once: its User-Agent and IP were read
        # As uWSGI does with its one environ: the server reuses the request for the next one.
        scopes[0].update(headers=[(b"user-agent", b"Someone Else")], client=("198.51.100.9", 1))
        collector.release()
        assert client.flush(10)
        received = collector.requests("/batch")
        assert sorted(r.json()["ip"] for r in received) == ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
        assert {r.headers["user-agent"] for r in received} == {UA}
        assert client.stats.enqueued == client.stats.delivered == 3
    finally:
        client.shutdown(timeout=1)


def test_a_busy_sender_builds_once_hand_overs_pile_up(collector: Collector) -> None:
    collector.hang()
    client = KoalaClient("pk_test", api_url=collector.url, max_in_flight=1, timeout=30.0)
    try:
        call = starlette_calls(client)
        call()
        assert wait_until(lambda: len(collector.requests("/batch", accepted_only=False)) == 1)
        queue = client._sender._queue  # type: ignore[union-attr]
        call()  # wakes the idle sender: built, then waiting for its turn
        assert wait_until(lambda: not queue.unbuilt and len(queue.waiting) == 1)
        time.sleep(0.05)  # the sender's loop asleep until an attempt ends
        two_batches = queue.pending_bytes
        for _ in range(_worker.BUILD_AFTER - 1):
            call()
        assert len(queue.unbuilt) == _worker.BUILD_AFTER - 1  # no wake-up per request
        call()  # the BUILD_AFTER-th wakes it
        assert wait_until(lambda: not queue.unbuilt)
        assert queue.pending_bytes >= two_batches * (_worker.BUILD_AFTER + 2) // 2  # their size counts now
        assert client.stats.enqueued == _worker.BUILD_AFTER + 2
    finally:
        collector.release()
        client.shutdown(timeout=2)
    assert client.stats.delivered == _worker.BUILD_AFTER + 2


def test_a_full_queue_refuses_the_hand_over_counted_with_its_events(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    collector.hang()
    client = KoalaClient("pk_test", api_url=collector.url, max_in_flight=1, max_queue_batches=1, timeout=30.0)
    try:
        call = starlette_calls(client)
        call()
        with caplog.at_level(logging.WARNING, "koala_middleware"):
            refused = call()
        assert refused._request is None
        assert client.stats.dropped == {"queue_full": 1}
        assert client.stats.events_dropped == {"queue_full": 1}
        assert client.stats.enqueued == 1
        assert "queue_full" in caplog.text
    finally:
        collector.release()
        client.shutdown(timeout=2)


def test_max_queue_bytes_applies_when_the_batches_are_built(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    client = KoalaClient("pk_test", api_url=collector.url, max_queue_bytes=100, **FAST_RETRIES)
    try:
        with caplog.at_level(logging.WARNING, "koala_middleware"):
            starlette_calls(client)()
            assert client.flush(5)  # the refused hand-over leaves nothing pending
        assert client.stats.dropped == {"queue_bytes_full": 1}
        assert client.stats.events_dropped == {"queue_bytes_full": 1}
        assert client.stats.enqueued == 0  # counted at the hand-over, taken back when refused
        assert "queue_bytes_full" in caplog.text
        assert collector.requests("/batch") == []
    finally:
        client.shutdown(timeout=1)


def test_shutdown_counts_the_hand_overs_not_built_yet(collector: Collector) -> None:
    collector.hang()
    client = KoalaClient("pk_test", api_url=collector.url, max_in_flight=1, timeout=30.0)
    call = starlette_calls(client)
    call()
    assert wait_until(lambda: len(collector.requests("/batch", accepted_only=False)) == 1)
    trackers = [call() for _ in range(5)]
    assert client.shutdown(timeout=0.5) is False
    stats = client.stats
    assert stats.dropped == {"shutdown": 6} and stats.events_dropped == {"shutdown": 6}
    assert stats.enqueued == 6 and stats.queued == 0
    assert all(tracker._request is None for tracker in trackers)
    collector.release()


class _Broken:
    """A hand-over whose batches cannot be built (a bug in the building)."""

    def _take(self) -> list[Any]:
        raise RuntimeError("boom")


def test_a_hand_over_that_fails_to_build_is_counted_and_never_blocks_a_flush(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    client = KoalaClient("pk_test", api_url=collector.url, **FAST_RETRIES)
    try:
        with caplog.at_level(logging.ERROR, "koala_middleware"):
            client._hand_over(_Broken())  # type: ignore[arg-type]
            starlette_calls(client)()
            assert client.flush(5)
        assert client.stats.dropped == {"error": 1}
        assert client.stats.delivered == 1
        assert client.stats.enqueued == 2  # each handed over: one delivered, one given up
        assert _worker.LOG_UNBUILDABLE in caplog.text
    finally:
        client.shutdown(timeout=1)


def test_no_sender_thread_counts_the_hand_over(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: SenderThread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(SenderThread, "start", fail)
    client = KoalaClient("pk_test", api_url=collector.url, **FAST_RETRIES)
    tracker = starlette_calls(client)()
    assert client.stats.dropped == {"error": 1} and client.stats.events_dropped == {"error": 1}
    assert client.stats.enqueued == 1  # handed over, then given up, as a batch that waited
    assert tracker._request is None
    assert client.flush(1)
    monkeypatch.undo()
    client.shutdown(timeout=1)


@pytest.mark.parametrize(
    "options", [{"dry_run": True}, {"sync": True}, {"spool_dir": "spool"}], ids=["dry_run", "sync", "spool"]
)
def test_where_a_batch_must_exist_at_once_it_is_built_at_the_hand_over(
    collector: Collector, options: dict[str, Any], tmp_path: Any
) -> None:
    if "spool_dir" in options:
        options = {"spool_dir": tmp_path / "spool"}
    client = KoalaClient("pk_test", api_url=collector.url, **options, **FAST_RETRIES)
    try:
        assert client._hand_over == client._send_tracker
        tracker = starlette_calls(client)()
        assert tracker._request is None
        assert client.flush(5)
        if client.dry_run:
            assert len(client.dry_run_batches) == 1
        else:
            assert len(collector.requests("/batch")) == 1
    finally:
        client.shutdown(timeout=1)
