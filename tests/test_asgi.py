"""KoalaASGIMiddleware on bare ASGI apps and on Starlette, against the local collector.

Protocol facts (what the middleware does to ``scope`` and to each ``send`` message, and when
it hands the tracker over) are checked by calling the middleware as a server would, with
real ASGI apps; Starlette apps run under Starlette's TestClient, which also drives the
lifespan and websocket protocols. Real-server behaviour (streaming over a socket, SIGTERM)
is in ``tests/e2e/test_uvicorn.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

with warnings.catch_warnings():  # recent Starlette asks for httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from helpers import FAST_RETRIES, assert_no_garbage_cycles
from koala_middleware import KoalaClient, Tracker, current_tracker
from koala_middleware.asgi import SCOPE_KEY, VISITOR_ID_KEY, KoalaASGIMiddleware
from koala_middleware.testing import Collector

UA = "Mozilla/5.0 (X11; Linux x86_64) koala-asgi-test"
VISITOR = "0b6f3c1e-2d4a-4f5b-8c7d-9e0f1a2b3c4d"
OTHER = "7d444840-9dc0-41cc-a7b0-1a2b3c4d5e6f"

Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]


class Boom(Exception):
    pass


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the harness below uses asyncio primitives


def http_scope(path: str = "/", headers: Iterable[tuple[bytes, bytes]] = (), **extra: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"www.example.com"), (b"user-agent", UA.encode()), *headers],
        "client": ("203.0.113.7", 50123),
        "server": ("127.0.0.1", 8000),
        **extra,
    }


@dataclass
class Served:
    """What a server received from the app through the middleware."""

    messages: list[Message] = field(default_factory=list)

    @property
    def start(self) -> Message:
        return next(m for m in self.messages if m["type"] == "http.response.start")

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.start["headers"])

    def cookies(self) -> list[str]:
        """The response's Set-Cookie values but the server-kept copy's (see copies())."""
        return [c for c in self.all_cookies() if not c.startswith("ko_id_server=")]

    def all_cookies(self) -> list[str]:
        return [v.decode() for k, v in self.headers if k == b"set-cookie"]

    def copies(self) -> list[str]:
        return [c for c in self.all_cookies() if c.startswith("ko_id_server=")]

    def ko_id(self) -> str:
        (cookie,) = [c for c in self.cookies() if c.startswith("ko_id=")]
        return cookie.split(";")[0].partition("=")[2]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")


async def serve(app: Any, scope: dict[str, Any], on_send: Callable[[Message], None] | None = None) -> Served:
    """Call ``app`` as a server does for one HTTP request with an empty body."""
    served = Served()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        served.messages.append(message)
        if on_send is not None:
            on_send(message)

    await app(scope, receive, send)
    return served


async def respond(send: Send, body: bytes = b"hello", headers: Iterable[tuple[bytes, bytes]] | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")] if headers is None else headers,
        }
    )
    await send({"type": "http.response.body", "body": body})


def recording_app(seen: list[Tracker], event: str | None = "Viewed Pricing") -> Any:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        tracker = scope[SCOPE_KEY]
        assert scope["state"]["koala"] is tracker and current_tracker() is tracker
        seen.append(tracker)
        if event is not None:
            tracker.track(event, {"plan": "pro"})
        await respond(send)

    return app


@pytest.mark.anyio
async def test_user_agent_and_ip_are_read_when_needed_and_the_request_let_go_after(dry: KoalaClient) -> None:
    seen: list[Tracker] = []
    mw = KoalaASGIMiddleware(recording_app(seen, event=None), client=dry)
    await serve(mw, http_scope(headers=[(b"cookie", f"ko_id={VISITOR}".encode())]))
    unused = seen[-1]
    assert unused._request is None and (unused.user_agent, unused.ip) == (None, None)  # never needed

    mw = KoalaASGIMiddleware(recording_app(seen), client=dry)  # records: the batch needs them
    await serve(mw, http_scope(headers=[(b"cookie", f"ko_id={VISITOR}".encode())]))
    assert (seen[-1].user_agent, seen[-1].ip) == (UA, "203.0.113.7")
    assert dry.dry_run_batches[-1].user_agent == UA and dry.dry_run_batches[-1].json()["ip"] == "203.0.113.7"


def test_requests_leave_no_reference_cycle_behind(dry: KoalaClient) -> None:
    # The tracker reads the request lazily, and the request holds the tracker: the middleware
    # must undo that when done, or every request's objects wait for the garbage collector.
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["path"] == "/track":
            scope[SCOPE_KEY].track("Viewed Pricing")
        await respond(send)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    def request(path: str, headers: list[tuple[bytes, bytes]]) -> None:
        coroutine = KoalaASGIMiddleware(app, client=dry)(http_scope(path, headers=headers), receive, send)
        with pytest.raises(StopIteration):  # nothing here waits: one step runs the request
            coroutine.send(None)

    returning = [(b"cookie", f"ko_id={VISITOR}".encode())]
    for path, headers in [("/", returning), ("/", []), ("/track", returning)]:
        assert_no_garbage_cycles(lambda: request(path, headers))  # noqa: B023 (called at once)


# -- the ko_id cookie ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_new_visitor_gets_a_cookie_and_a_tracker_with_that_id(dry: KoalaClient) -> None:
    seen: list[Tracker] = []
    served = await serve(KoalaASGIMiddleware(recording_app(seen), client=dry), http_scope())
    assert served.start["status"] == 200 and served.body == b"hello"
    (cookie,) = served.cookies()
    name_value, *attributes = cookie.split("; ")
    name, _, visitor_id = name_value.partition("=")
    assert name == "ko_id" and str(uuid.UUID(visitor_id)) == visitor_id and uuid.UUID(visitor_id).version == 4
    assert "Domain=example.com" in attributes and "Path=/" in attributes and "SameSite=Lax" in attributes
    assert "HttpOnly" not in cookie and "Secure" not in cookie  # the pixel reads it; plain http
    (tracker,) = seen
    assert (tracker.profile_id, tracker.user_agent, tracker.ip) == (visitor_id, UA, "203.0.113.7")
    assert current_tracker() is None  # unbound once the app returned
    assert dry.dry_run_batches[-1].json()["profile_id"] == visitor_id


@pytest.mark.anyio
async def test_cookie_is_secure_on_https_and_scoped_to_the_top_domain(dry: KoalaClient) -> None:
    scope = http_scope(scheme="https")
    scope["headers"][0] = (b"host", b"shop.example.co.uk:8443")
    (cookie,) = (await serve(KoalaASGIMiddleware(recording_app([]), client=dry), scope)).cookies()
    assert "; Domain=example.co.uk;" in cookie and cookie.endswith("; Secure")


@pytest.mark.anyio
async def test_every_cookie_header_is_read_and_a_returning_visitor_keeps_their_id(dry: KoalaClient) -> None:
    seen: list[Tracker] = []
    mw = KoalaASGIMiddleware(recording_app(seen), client=dry)
    # HTTP/2 may send one cookie header per cookie; the first valid ko_id among them wins.
    several = [
        (b"cookie", b"theme=dark"),
        (b"cookie", b"ko_id=forged"),
        (b"cookie", f"ko_id={VISITOR}".encode()),
        (b"cookie", f"ko_id={OTHER}".encode()),
    ]
    served = await serve(mw, http_scope(headers=several))
    assert served.cookies() == [] and seen[-1].profile_id == VISITOR
    assert dry.dry_run_batches[-1].json()["profile_id"] == VISITOR


@pytest.mark.anyio
async def test_header_names_are_read_lower_case_as_asgi_servers_send_them(dry: KoalaClient) -> None:
    # As Starlette's Headers does; a hand-made scope with "Cookie" is a new visitor, safely.
    seen: list[Tracker] = []
    mw = KoalaASGIMiddleware(recording_app(seen), client=dry)
    served = await serve(mw, http_scope(headers=[(b"Cookie", f"ko_id={VISITOR}".encode())]))
    assert len(served.cookies()) == 1 and seen[-1].profile_id not in (VISITOR, None)


@pytest.mark.parametrize(
    "forged",
    ["not.a.uuid", "00000000-0000-0000-0000-000000000000", "x" * 15, "<script>alert(1)</script>", VISITOR + ".x"],
)
@pytest.mark.anyio
async def test_forged_cookie_is_replaced_and_never_reflected(dry: KoalaClient, forged: str) -> None:
    seen: list[Tracker] = []
    mw = KoalaASGIMiddleware(recording_app(seen), client=dry)
    served = await serve(mw, http_scope(headers=[(b"cookie", f"ko_id={forged}".encode())]))
    (cookie,) = served.cookies()
    assert forged not in cookie
    assert seen[0].profile_id == served.ko_id() != forged
    assert forged not in dry.dry_run_batches[-1].body.decode()


@pytest.mark.anyio
async def test_the_apps_headers_and_all_its_set_cookies_survive_in_order(dry: KoalaClient) -> None:
    app_headers = (
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"session=abc; HttpOnly"),
        (b"x-request-id", b"42"),
        (b"set-cookie", b"theme=dark"),
    )
    sent: list[Message] = []

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        # Headers as a one-shot iterable: the middleware must read them only once.
        start = {"type": "http.response.start", "status": 201, "headers": iter(app_headers), "trailers": False}
        sent.append(start)
        await send(start)
        await send({"type": "http.response.body", "body": b"created"})

    served = await serve(KoalaASGIMiddleware(app, client=dry), http_scope())
    headers = served.headers
    assert headers[:4] == list(app_headers)
    assert len(headers) == 6 and headers[4][0] == b"set-cookie" and headers[4][1].startswith(b"ko_id=")
    assert headers[5][0] == b"set-cookie" and headers[5][1].startswith(b"ko_id_server=")
    assert served.start["status"] == 201 and served.start["trailers"] is False
    assert sent[0]["headers"] is not served.start["headers"]  # the app's message is copied, not changed


@pytest.mark.parametrize(
    ("status", "headers"),
    [(200, [(b"cache-control", b"public, max-age=600")]), (200, [(b"Cache-Control", b"s-maxage=60")]), (304, [])],
)
@pytest.mark.anyio
async def test_no_cookie_on_responses_a_shared_cache_may_store_or_on_304(
    dry: KoalaClient, status: int, headers: list[tuple[bytes, bytes]]
) -> None:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    served = await serve(KoalaASGIMiddleware(app, client=dry), http_scope())
    assert served.cookies() == [] and served.headers == headers


@pytest.mark.anyio
async def test_excluded_paths_and_opted_out_visitors_get_a_disabled_tracker_and_no_cookie(dry: KoalaClient) -> None:
    seen: list[Tracker] = []
    mw = KoalaASGIMiddleware(recording_app(seen), client=dry, exclude_paths=["/healthz", "/caf\u00e9"])
    for scope in (
        http_scope("/healthz"),
        http_scope("/healthz/deep"),
        http_scope("/caf\u00e9"),
        http_scope("/pricing", headers=[(b"sec-gpc", b"1")]),
    ):
        assert (await serve(mw, scope)).cookies() == []
    assert [t.enabled for t in seen] == [False, False, False, False]
    assert dry.stats.dry_run == 0 and not dry.dry_run_batches
    assert (await serve(mw, http_scope("/healthzz"))).cookies() != []


# -- what is delivered, and when ------------------------------------------------------------


@pytest.mark.anyio
async def test_batch_is_handed_over_after_the_final_body_with_the_visitors_user_agent_and_ip(
    client: KoalaClient, collector: Collector
) -> None:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        tracker = scope[SCOPE_KEY]
        tracker.identify("ada@example.com", {"name": "Ada"})
        tracker.track("Viewed Pricing", {"plan": "pro"})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part ", "more_body": True})
        await send({"type": "http.response.body", "body": b"end", "more_body": False})

    handed_over_at_send: list[int] = []
    mw = KoalaASGIMiddleware(app, client=client)
    scope = http_scope(headers=[(b"cookie", f"ko_id={VISITOR}".encode())])
    served = await serve(mw, scope, on_send=lambda m: handed_over_at_send.append(client.stats.enqueued))
    assert served.body == b"part end"
    assert handed_over_at_send == [0, 0, 0]  # nothing handed over while the response went out
    assert client.stats.enqueued == 1  # ...and right after the app returned
    assert collector.wait_for(1)
    (received,) = collector.requests()
    assert received.path == "/web/projects/pk_test/batch" and received.headers["user-agent"] == UA
    body = received.json()
    assert body["profile_id"] == VISITOR and body["email"] == "ada@example.com" and body["ip"] == "203.0.113.7"
    assert [e["event"] for e in body["events"]] == ["Viewed Pricing"]


@pytest.mark.anyio
async def test_one_batch_per_request_and_none_when_nothing_was_recorded(
    client: KoalaClient, collector: Collector
) -> None:
    busy = KoalaASGIMiddleware(recording_app([], "Clicked"), client=client)
    idle = KoalaASGIMiddleware(recording_app([], None), client=client)
    for app in (busy, idle, busy, idle, idle):
        await serve(app, http_scope())
    assert await asyncio.to_thread(client.flush, 10)
    assert client.stats.enqueued == 2
    assert len(collector.requests(accepted_only=False)) == 2
    assert [e["event"] for e in collector.events()] == ["Clicked", "Clicked"]


@pytest.mark.anyio
async def test_streamed_chunks_pass_straight_through_and_events_tracked_meanwhile_are_sent_after(
    dry: KoalaClient,
) -> None:
    served_so_far: list[Served] = []

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first ", "more_body": True})
        assert served_so_far[0].body == b"first "  # already at the server, not buffered
        current_tracker().track("Streamed")  # type: ignore[union-attr]
        assert dry.stats.dry_run == 0
        await send({"type": "http.response.body", "body": b"second", "more_body": False})

    served = Served()
    served_so_far.append(served)

    async def send(message: Message) -> None:
        served.messages.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    await KoalaASGIMiddleware(app, client=dry)(http_scope(), receive, send)
    assert served.body == b"first second" and served.cookies()
    assert [e["event"] for e in dry.dry_run_batches[-1].json()["events"]] == ["Streamed"]


@pytest.mark.parametrize("after_start", [False, True])
@pytest.mark.anyio
async def test_exceptions_propagate_unchanged_and_what_was_recorded_is_sent(
    client: KoalaClient, collector: Collector, after_start: bool
) -> None:
    raised = Boom("handler failed")

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        scope[SCOPE_KEY].track("Started Checkout")
        if after_start:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise raised

    with pytest.raises(Boom) as info:  # a returning visitor: a new one's id never reached a browser
        await serve(
            KoalaASGIMiddleware(app, client=client), http_scope(headers=[(b"cookie", f"ko_id={VISITOR}".encode())])
        )
    assert info.value is raised and info.value.__context__ is None and info.value.__cause__ is None
    assert current_tracker() is None
    assert await asyncio.to_thread(collector.wait_for, 1)
    assert [e["event"] for e in collector.events()] == ["Started Checkout"]


@pytest.mark.anyio
async def test_concurrent_requests_each_see_their_own_tracker(dry: KoalaClient) -> None:
    inside: list[str] = []
    all_inside = asyncio.Event()  # a barrier (asyncio.Barrier is 3.11+)
    mismatches: list[str] = []

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        inside.append(scope["path"])
        if len(inside) == 4:
            all_inside.set()
        await all_inside.wait()  # all four are inside the app at once
        await asyncio.sleep(0)
        if current_tracker() is not scope[SCOPE_KEY]:
            mismatches.append(scope["path"])
        await respond(send, scope[SCOPE_KEY].profile_id.encode())

    mw = KoalaASGIMiddleware(app, client=dry)
    results = await asyncio.wait_for(asyncio.gather(*(serve(mw, http_scope(f"/{i}")) for i in range(4))), 10)
    assert not mismatches
    assert len({r.body for r in results}) == 4 and all(r.ko_id() == r.body.decode() for r in results)


@pytest.mark.anyio
async def test_sync_mode_delivers_before_the_app_call_returns_without_blocking_the_loop() -> None:
    with Collector(delay=0.5) as slow:
        client = KoalaClient("pk_test", api_url=slow.url, sync=True, **FAST_RETRIES)
        try:
            finished: list[str] = []

            async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
                if scope["path"] == "/track":
                    scope[SCOPE_KEY].track("Signed Up")
                await respond(send)

            mw = KoalaASGIMiddleware(app, client=client)

            async def request(path: str) -> None:
                await serve(mw, http_scope(path))
                finished.append(path)
                if path == "/track":  # sync mode: posted (and answered) before the call returned
                    assert len(slow.requests()) == 1

            async def other_visitor() -> None:
                while not slow.requests(accepted_only=False):  # the slow post is under way...
                    await asyncio.sleep(0.005)
                await request("/quiet")  # ...and another request is served meanwhile

            await asyncio.wait_for(asyncio.gather(request("/track"), other_visitor()), 10)
            assert finished == ["/quiet", "/track"]
        finally:
            client.shutdown(2)


# -- other scopes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"cookie", f"ko_id={VISITOR}".encode())], VISITOR),
        ([], None),  # a new visitor: an id no browser would keep is of no use
        ([(b"cookie", b"ko_id=forged")], None),
        ([(b"cookie", f"ko_id={VISITOR}".encode()), (b"sec-gpc", b"1")], None),  # opted out
    ],
)
@pytest.mark.anyio
async def test_websockets_may_read_the_visitor_id_but_get_no_cookie_or_tracker(
    dry: KoalaClient, headers: list[tuple[bytes, bytes]], expected: str | None
) -> None:
    server_send_calls: list[Message] = []

    async def server_send(message: Message) -> None:
        server_send_calls.append(message)

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        assert send is server_send  # untouched: nothing is ever added to a websocket reply
        assert SCOPE_KEY not in scope and current_tracker() is None
        await send({"type": "websocket.accept", "headers": []})
        await send({"type": "websocket.send", "text": str(scope[VISITOR_ID_KEY])})

    scope = {**http_scope("/ws", headers), "type": "websocket", "scheme": "ws"}
    del scope["method"]
    await KoalaASGIMiddleware(app, client=dry)(scope, receive, server_send)
    assert scope[VISITOR_ID_KEY] == expected
    assert server_send_calls == [
        {"type": "websocket.accept", "headers": []},
        {"type": "websocket.send", "text": str(expected)},
    ]
    assert dry.stats.dry_run == 0


@pytest.mark.anyio
async def test_unknown_scopes_pass_through_untouched(dry: KoalaClient) -> None:
    seen: list[tuple[dict[str, Any], Any, Any]] = []

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))

    async def receive() -> Message:
        raise AssertionError("not called")

    async def send(message: Message) -> None:
        raise AssertionError("not called")

    custom = {"type": "x-custom"}
    await KoalaASGIMiddleware(app, client=dry)(custom, receive, send)
    assert seen == [({"type": "x-custom"}, receive, send)]


async def run_lifespan(mw: KoalaASGIMiddleware, during: Callable[[], Any]) -> list[tuple[str, int]]:
    """Drive the lifespan protocol as a server does, running ``during()`` between startup and
    shutdown; returns each message the server got, with the client's pending count then."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    replies: list[tuple[str, int]] = []
    started = asyncio.Event()

    async def send(message: Message) -> None:
        replies.append((message["type"], mw.client.stats.queued))
        started.set()

    task = asyncio.create_task(mw({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    await asyncio.wait_for(started.wait(), 10)
    await during()
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, 20)
    return replies


async def no_lifespan_raises(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    assert scope["type"] == "http", "only HTTP here"  # what many bare apps do
    scope[SCOPE_KEY].track("Clicked")
    await respond(send)


async def no_lifespan_returns(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await no_lifespan_raises(scope, receive, send)


@pytest.mark.parametrize("app", [no_lifespan_raises, no_lifespan_returns])
@pytest.mark.anyio
async def test_an_app_without_lifespan_gets_it_answered_and_still_flushes_at_shutdown(app: Any) -> None:
    with Collector(delay=0.5) as slow:  # the batch is still pending when shutdown begins
        client = KoalaClient("pk_test", api_url=slow.url, shutdown_timeout=10, **FAST_RETRIES)
        try:
            mw = KoalaASGIMiddleware(app, client=client)

            async def one_request() -> None:
                await serve(mw, http_scope())
                assert client.stats.queued == 1

            replies = await run_lifespan(mw, one_request)
            assert replies == [("lifespan.startup.complete", 0), ("lifespan.shutdown.complete", 0)]
            assert [e["event"] for e in slow.events()] == ["Clicked"]
        finally:
            client.shutdown(2)


@pytest.mark.anyio
async def test_lifespan_errors_of_an_app_that_speaks_lifespan_propagate_unchanged(dry: KoalaClient) -> None:
    raised = Boom("database unreachable")

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        raise raised

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent for the app")

    with pytest.raises(Boom) as info:
        await KoalaASGIMiddleware(app, client=dry)({"type": "lifespan"}, receive, send)
    assert info.value is raised


@pytest.mark.anyio
async def test_an_inner_middleware_leaves_a_request_the_outer_one_handled(dry: KoalaClient) -> None:
    seen: list[Tracker] = []
    inner = KoalaASGIMiddleware(recording_app(seen), client=KoalaClient(dry_run=True))
    served = await serve(KoalaASGIMiddleware(inner, client=dry), http_scope())
    assert len(served.cookies()) == 1 and seen[0].profile_id == served.ko_id()
    assert dry.stats.dry_run == 1 and inner.client.stats.dry_run == 0


def test_middleware_options_build_a_client_and_bad_options_fail_at_once(collector: Collector) -> None:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await respond(send)

    mw = KoalaASGIMiddleware(app, public_key="pk_test", api_url=collector.url, cookie_domain="example.com")
    try:
        assert mw.client.public_key == "pk_test" and mw.client.api_url == collector.url
        scope = http_scope()
        scope["headers"][0] = (b"host", b"a.b.example.com")
        (cookie,) = asyncio.run(serve(mw, scope)).cookies()
        assert "; Domain=example.com;" in cookie
    finally:
        mw.client.shutdown(1)
    with pytest.raises(TypeError, match=r"unknown option.*'cookie_domian'"):
        KoalaASGIMiddleware(app, public_key="pk_test", cookie_domian="example.com")
    with pytest.raises(TypeError, match="not alongside client="):
        KoalaASGIMiddleware(app, client=KoalaClient(dry_run=True), timeout=3)


# -- Starlette, under its TestClient ---------------------------------------------------------


def starlette_app(client: KoalaClient, events: list[str] | None = None, **options: Any) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events is not None and events.append("startup")
        yield
        events is not None and events.append("shutdown")
        with client.tracker(email="ops@example.com") as tracker:  # tracked while shutting down
            tracker.track("Server Stopped")

    async def home(request: Request) -> PlainTextResponse:
        tracker = request.state.koala
        assert tracker is request.scope[SCOPE_KEY] is current_tracker()
        tracker.track("Viewed Home")
        response = PlainTextResponse(tracker.profile_id or "-")
        response.set_cookie("session", "abc", httponly=True)
        response.set_cookie("theme", "dark")
        return response

    async def signup(request: Request) -> PlainTextResponse:
        request.state.koala.track("Signed Up")

        def welcome() -> None:  # a background task runs after the response, and may track
            tracker = current_tracker()
            assert tracker is not None
            tracker.track("Welcome Email Sent")

        return PlainTextResponse("ok", background=BackgroundTask(welcome))

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(str(websocket.scope[VISITOR_ID_KEY]))
        await websocket.close()

    app = Starlette(
        routes=[Route("/", home), Route("/signup", signup, methods=["POST"]), WebSocketRoute("/ws", chat)],
        lifespan=lifespan,
    )
    app.add_middleware(KoalaASGIMiddleware, client=client, **options)
    return app


def test_starlette_app_keeps_its_own_set_cookies_and_gets_request_state_koala(dry: KoalaClient) -> None:
    with TestClient(starlette_app(dry), headers={"User-Agent": UA}) as browser:
        response = browser.get("/")
        cookies = response.headers.get_list("set-cookie")
        assert [c.split("=")[0] for c in cookies] == ["session", "theme", "ko_id", "ko_id_server"]
        assert response.cookies["ko_id"] == response.text
        again = browser.get("/")  # the browser sends the cookie back
        assert again.text == response.text and [c.split("=")[0] for c in again.headers.get_list("set-cookie")] == [
            "session",
            "theme",
        ]
        with browser.websocket_connect("/ws") as websocket:
            assert websocket.receive_text() == response.text
    batches = [b.json() for b in dry.dry_run_batches]
    assert [b["events"][0]["event"] for b in batches[:2]] == ["Viewed Home", "Viewed Home"]
    assert {b.get("profile_id") for b in batches[:2]} == {response.text}


def test_background_task_events_go_in_the_requests_batch(dry: KoalaClient) -> None:
    with TestClient(starlette_app(dry)) as browser:
        assert browser.post("/signup").text == "ok"
    (batch, *_) = dry.dry_run_batches
    assert [e["event"] for e in batch.json()["events"]] == ["Signed Up", "Welcome Email Sent"]


def test_lifespan_passes_through_and_shutdown_waits_until_batches_are_delivered() -> None:
    with Collector(delay=0.5) as slow:  # every batch is still pending when shutdown begins
        client = KoalaClient("pk_test", api_url=slow.url, shutdown_timeout=10, **FAST_RETRIES)
        events: list[str] = []
        try:
            with TestClient(starlette_app(client, events)) as browser:
                assert events == ["startup"]
                ids = [browser.get("/").text for _ in range(5)]
                assert client.stats.enqueued == 5
            # TestClient's exit returned once the app reported shutdown complete: by then,
            # everything is at Koala, including what the shutdown handler tracked.
            assert events == ["startup", "shutdown"]
            assert client.stats.delivered == 6 and client.stats.queued == 0
            visitors = sorted(b["profile_id"] for b in slow.batches() if "profile_id" in b)
            assert visitors == sorted(ids)
            assert "Server Stopped" in [e["event"] for e in slow.events()]
        finally:
            client.shutdown(2)


def test_a_wrong_option_given_to_add_middleware_fails_at_startup(dry: KoalaClient) -> None:
    app = starlette_app(KoalaClient(dry_run=True))
    app.user_middleware.clear()
    app.add_middleware(KoalaASGIMiddleware, public_key="pk_test", cookie_domian="example.com")
    with pytest.raises(TypeError, match="cookie_domian"), TestClient(app):
        pass
