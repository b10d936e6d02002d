"""KoalaWSGIMiddleware on plain WSGI apps (no framework), checked against PEP 3333.

Apps run under wsgiref's PEP 3333 ``validator`` on both sides of the middleware (it checks
the middleware behaves as a conforming app to the server and a conforming server to the
app), directly for ordering facts (nothing handed over before ``close()``), and under the
stdlib's real ``wsgiref`` server on loopback for what only a server shows (streaming,
``start_response`` called again with ``exc_info``). Koala is the local collector.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import httpx
import pytest
from werkzeug.middleware.proxy_fix import ProxyFix

from helpers import assert_no_garbage_cycles
from koala_middleware import KoalaClient, Tracker, current_tracker
from koala_middleware.testing import Collector
from koala_middleware.wsgi import ENVIRON_KEY, KoalaWSGIMiddleware

UA = "Mozilla/5.0 (X11; Linux x86_64) koala-wsgi-test"
VISITOR = "0b6f3c1e-2d4a-4f5b-8c7d-9e0f1a2b3c4d"

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Boom(Exception):
    pass


@dataclass
class Served:
    status: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def cookies(self) -> list[str]:
        """The response's Set-Cookie values but the server-kept copy's."""
        return [v for k, v in self.headers if k.lower() == "set-cookie" and not v.startswith("ko_id_server=")]


def environ(path: str = "/", **extra: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "REMOTE_ADDR": "203.0.113.7",
        "HTTP_USER_AGENT": UA,
        "HTTP_HOST": "www.example.com",
    }
    env.update(extra)
    setup_testing_defaults(env)
    return env


def serve(app: App, env: dict[str, Any]) -> Served:
    """What a PEP 3333 server does: call, iterate, close (always)."""
    served = Served()

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        served.status, served.headers = status, headers
        return chunks.append

    chunks: list[bytes] = []
    result = app(env, start_response)
    try:
        chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    served.body = b"".join(chunks)
    return served


def wrap(app: App, client: KoalaClient, **options: Any) -> App:
    """The middleware between two validators: each side checks the PEP for the other."""
    return validator(KoalaWSGIMiddleware(validator(app), client=client, **options))  # type: ignore[no-any-return]


def recording_app(seen: list[Tracker | None], event: str | None = "Viewed Pricing") -> App:
    def app(env: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        tracker = env[ENVIRON_KEY]
        assert current_tracker() is tracker
        seen.append(tracker)
        if event is not None:
            tracker.track(event, {"plan": "pro"})
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello"]

    return app


# -- the ko_id cookie ------------------------------------------------------------------------


def test_new_visitor_gets_a_cookie_and_a_tracker_with_that_id(dry: KoalaClient) -> None:
    seen: list[Tracker | None] = []
    served = serve(wrap(recording_app(seen), dry), environ())
    assert served.status == "200 OK" and served.body == b"hello"
    (cookie,) = served.cookies()
    name_value, *attributes = cookie.split("; ")
    name, _, visitor_id = name_value.partition("=")
    assert name == "ko_id" and uuid.UUID(visitor_id).version == 4 and str(uuid.UUID(visitor_id)) == visitor_id
    assert "Domain=example.com" in attributes and "Path=/" in attributes and "SameSite=Lax" in attributes
    assert any(a.startswith("Max-Age=") and int(a[8:]) > 180 * 24 * 3600 for a in attributes)
    assert "HttpOnly" not in cookie and "Secure" not in cookie  # the pixel reads it; plain http
    tracker = seen[0]
    assert tracker is not None
    assert (tracker.profile_id, tracker.user_agent, tracker.ip) == (visitor_id, UA, "203.0.113.7")
    assert current_tracker() is None  # unbound once the response is closed


def test_cookie_is_secure_on_https_and_scoped_to_the_top_domain(dry: KoalaClient) -> None:
    served = serve(
        wrap(recording_app([]), dry),
        environ(HTTP_HOST="shop.example.co.uk:8443", **{"wsgi.url_scheme": "https"}),
    )
    (cookie,) = served.cookies()
    assert "; Domain=example.co.uk;" in cookie and cookie.endswith("; Secure")


def test_returning_visitor_keeps_their_id_and_gets_no_cookie(dry: KoalaClient) -> None:
    seen: list[Tracker | None] = []
    served = serve(wrap(recording_app(seen), dry), environ(HTTP_COOKIE=f"theme=dark; ko_id={VISITOR}"))
    assert served.cookies() == []
    assert seen[0] is not None and seen[0].profile_id == VISITOR
    assert dry.dry_run_batches[-1].json()["profile_id"] == VISITOR


@pytest.mark.parametrize(
    "forged",
    [
        "not.a.uuid",
        "00000000-0000-0000-0000-000000000000",  # the nil UUID
        "x" * 15,  # too short
        "<script>alert(1)</script>",
        VISITOR + ".x",
    ],
)
def test_forged_cookie_is_replaced_and_never_reflected(dry: KoalaClient, forged: str) -> None:
    seen: list[Tracker | None] = []
    served = serve(wrap(recording_app(seen), dry), environ(HTTP_COOKIE=f"ko_id={forged}"))
    (cookie,) = served.cookies()
    assert forged not in cookie
    fresh = cookie.split(";")[0].partition("=")[2]
    assert seen[0] is not None and seen[0].profile_id == fresh != forged
    assert forged not in dry.dry_run_batches[-1].body.decode()


def test_no_cookie_on_a_response_a_shared_cache_may_store(dry: KoalaClient) -> None:
    def cached(env: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "public, max-age=600")])
        return [b"same for everyone"]

    assert serve(wrap(cached, dry), environ()).cookies() == []


# -- what is delivered, and when ------------------------------------------------------------


def test_batch_goes_to_koala_after_close_with_the_visitors_user_agent_and_ip(
    client: KoalaClient, collector: Collector
) -> None:
    def app(env: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        tracker = env[ENVIRON_KEY]
        tracker.identify("ada@example.com", {"name": "Ada"})
        tracker.track("Viewed Pricing", {"plan": "pro"})
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"body"

    mw = KoalaWSGIMiddleware(app, client=client)
    env = environ(HTTP_COOKIE=f"ko_id={VISITOR}")
    result = mw(env, lambda *a: None)
    assert b"".join(result) == b"body"
    assert client.stats.enqueued == 0  # the body went out, the response is not closed yet
    result.close()  # type: ignore[attr-defined]
    assert client.stats.enqueued == 1
    assert collector.wait_for(1)
    (received,) = collector.requests()
    assert received.path == "/web/projects/pk_test/batch"
    assert received.headers["user-agent"] == UA
    body = received.json()
    assert body["profile_id"] == VISITOR and body["email"] == "ada@example.com" and body["ip"] == "203.0.113.7"
    assert [e["event"] for e in body["events"]] == ["Viewed Pricing"]
    assert body["identifies"][0]["traits"] == {"name": "Ada", "email": "ada@example.com"}


def test_one_batch_per_request_and_none_when_nothing_was_recorded(client: KoalaClient, collector: Collector) -> None:
    busy = KoalaWSGIMiddleware(recording_app([], "Clicked"), client=client)
    idle = KoalaWSGIMiddleware(recording_app([], None), client=client)
    for app in (busy, idle, busy, idle, idle):
        serve(app, environ())
    assert client.flush(10)
    assert client.stats.enqueued == 2
    assert len(collector.requests(accepted_only=False)) == 2
    assert [e["event"] for e in collector.events()] == ["Clicked", "Clicked"]


def test_plain_http_x_forwarded_for_is_ignored_and_proxyfix_outside_is_honoured(dry: KoalaClient) -> None:
    seen: list[Tracker | None] = []
    forwarded = environ(REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="198.51.100.9")
    serve(KoalaWSGIMiddleware(recording_app(seen), client=dry), dict(forwarded))
    serve(ProxyFix(KoalaWSGIMiddleware(recording_app(seen), client=dry), x_for=1), dict(forwarded))
    assert [t.ip for t in seen if t is not None] == ["10.0.0.2", "198.51.100.9"]


def test_excluded_paths_get_a_disabled_tracker_and_no_cookie(dry: KoalaClient) -> None:
    seen: list[Tracker | None] = []

    def app(env: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        tracker = env[ENVIRON_KEY]
        seen.append(tracker)
        with pytest.raises(ValueError, match="must not be empty"):
            tracker.track("")  # still checked where it is called
        tracker.track("Health Checked")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    mw = wrap(app, dry, exclude_paths=["/healthz", "/caf\u00e9"])
    # PEP 3333 paths are the raw bytes as latin-1; exclude_paths are text, as in ASGI.
    for path in ("/healthz", "/healthz/deep", "/caf\u00e9".encode().decode("latin-1")):
        assert serve(mw, environ(path)).cookies() == []
    assert [t.enabled for t in seen if t is not None] == [False, False, False]
    assert dry.stats.dry_run == 0 and not dry.dry_run_batches
    assert serve(mw, environ("/healthzz")).cookies() != []


def test_middleware_options_build_a_client_and_bad_options_fail_at_once(collector: Collector) -> None:
    def app(env: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [])
        return []

    mw = KoalaWSGIMiddleware(app, public_key="pk_test", api_url=collector.url, cookie_domain="example.com")
    try:
        assert mw.client.public_key == "pk_test" and mw.client.api_url == collector.url
        (cookie,) = serve(mw, environ(HTTP_HOST="a.b.example.com")).cookies()
        assert "; Domain=example.com;" in cookie
    finally:
        mw.client.shutdown(1)
    with pytest.raises(TypeError, match=r"unknown option.*'cookie_domian'"):
        KoalaWSGIMiddleware(app, public_key="pk_test", cookie_domian="example.com")
    with pytest.raises(TypeError, match="not alongside client="):
        KoalaWSGIMiddleware(app, client=KoalaClient(dry_run=True), timeout=3)


# -- PEP 3333: close(), len(), streaming, errors ---------------------------------------------


class _Body:
    """A response iterable with a ``close()`` that counts (and may fail)."""

    def __init__(self, chunks: list[bytes], fail_on_close: bool = False) -> None:
        self.chunks = chunks
        self.closed = 0
        self.fail_on_close = fail_on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def close(self) -> None:
        self.closed += 1
        if self.fail_on_close:
            raise Boom("close failed")


def _returning(body: object) -> App:
    def app(env: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        env[ENVIRON_KEY].track("Downloaded")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body

    return app


def test_requests_leave_no_reference_cycle_behind(dry: KoalaClient) -> None:
    # As for ASGI: environ holds the tracker and the tracker reads environ lazily; close()
    # (and a raising app) must undo that, or every request waits for the garbage collector.
    def app(env: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if env["PATH_INFO"] == "/track":
            env[ENVIRON_KEY].track("Downloaded")
        if env["PATH_INFO"] == "/fail":
            raise RuntimeError("handler failed")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"ok"])

    def request(path: str, cookie: str | None) -> None:
        env = environ(path, **({"HTTP_COOKIE": cookie} if cookie else {}))
        try:
            result = KoalaWSGIMiddleware(app, client=dry)(env, lambda *a: None)
        except RuntimeError:
            return
        assert list(result) == [b"ok"]
        result.close()  # type: ignore[attr-defined]

    returning = f"ko_id={VISITOR}"
    for path, cookie in [("/", returning), ("/", None), ("/track", returning), ("/fail", returning)]:
        assert_no_garbage_cycles(lambda: request(path, cookie))  # noqa: B023 (called at once)


def test_close_is_passed_through_once_and_len_is_kept(dry: KoalaClient) -> None:
    body = _Body([b"one block"])
    result = KoalaWSGIMiddleware(_returning(body), client=dry)(environ(), lambda *a: None)
    assert len(result) == 1  # type: ignore[arg-type]  # lets a server send Content-Length
    assert list(result) == [b"one block"]
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]  # a second close is harmless
    assert body.closed == 1 and dry.stats.dry_run == 1
    generated = KoalaWSGIMiddleware(_returning(iter([b"x"])), client=dry)(environ(), lambda *a: None)
    assert not hasattr(generated, "__len__")
    generated.close()  # type: ignore[attr-defined]


def test_a_failing_close_still_hands_the_tracker_over(dry: KoalaClient) -> None:
    body = _Body([b"x"], fail_on_close=True)
    result = KoalaWSGIMiddleware(_returning(body), client=dry)(environ(), lambda *a: None)
    list(result)
    with pytest.raises(Boom, match="close failed"):
        result.close()  # type: ignore[attr-defined]
    assert body.closed == 1 and dry.stats.dry_run == 1
    assert current_tracker() is None


def test_streaming_is_lazy_and_events_tracked_while_streaming_are_sent_after_close(dry: KoalaClient) -> None:
    progress: list[str] = []

    def stream(env: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        progress.append("first")
        yield b"first "
        assert current_tracker() is env[ENVIRON_KEY]  # still this request's, mid-stream
        current_tracker().track("Streamed")  # type: ignore[union-attr]
        progress.append("second")
        yield b"second"

    mw = KoalaWSGIMiddleware(validator(stream), client=dry)
    served = Served()

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        served.status, served.headers = status, headers

    result = mw(environ(), start_response)
    assert progress == [] and served.status == ""  # nothing ran yet: the server drives it
    iterator = iter(result)
    assert next(iterator) == b"first "
    assert progress == ["first"] and served.cookies()  # headers (with the cookie) came first
    assert next(iterator) == b"second"
    assert list(iterator) == [] and dry.stats.dry_run == 0
    result.close()  # type: ignore[attr-defined]
    assert [e["event"] for e in dry.dry_run_batches[-1].json()["events"]] == ["Streamed"]


def test_tracker_is_current_only_while_app_code_runs_so_an_unclosed_response_leaks_nothing(
    dry: KoalaClient,
) -> None:
    def app(env: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            yield b"a"
            yield b"b"
        finally:  # runs in close() when the client went away mid-stream
            current_tracker().track("Download Aborted")  # type: ignore[union-attr]

    mw = KoalaWSGIMiddleware(app, client=dry)
    result = mw(environ(), lambda *a: None)
    assert current_tracker() is None  # the server's thread is clean between calls
    iterator = iter(result)
    assert next(iterator) == b"a" and current_tracker() is None
    result.close()  # type: ignore[attr-defined]
    assert [e["event"] for e in dry.dry_run_batches[-1].json()["events"]] == ["Download Aborted"]
    abandoned = KoalaWSGIMiddleware(_returning([b"x"]), client=dry)(environ(), lambda *a: None)
    # ...as a non-conforming server (or Flask's test client, unbuffered) that never closes
    next(iter(abandoned))
    assert current_tracker() is None


def test_handler_exception_propagates_unchanged_and_its_events_are_sent(
    client: KoalaClient, collector: Collector
) -> None:
    raised = Boom("handler failed")

    def app(env: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        env[ENVIRON_KEY].track("Started Checkout")
        raise raised

    mw = KoalaWSGIMiddleware(app, client=client)
    with pytest.raises(Boom) as info:  # a returning visitor: a new one's id never reached a browser
        mw(environ(HTTP_COOKIE=f"ko_id={VISITOR}"), lambda *a: None)
    assert info.value is raised
    assert current_tracker() is None
    assert collector.wait_for(1)
    assert [e["event"] for e in collector.events()] == ["Started Checkout"]


def test_exception_while_streaming_still_sends_what_was_recorded(dry: KoalaClient) -> None:
    def app(env: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"partial"
        env[ENVIRON_KEY].track("Export Failed")
        raise Boom("mid-stream")

    with pytest.raises(Boom, match="mid-stream"):
        serve(wrap(app, dry), environ())
    assert [e["event"] for e in dry.dry_run_batches[-1].json()["events"]] == ["Export Failed"]


def test_start_response_again_with_exc_info_reaches_the_server_unchanged(dry: KoalaClient) -> None:
    calls: list[tuple[str, list[tuple[str, str]], Any]] = []

    def server_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        calls.append((status, headers, exc_info))
        return lambda data: None

    def app(env: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise Boom("late")
        except Boom:
            exc_info = sys.exc_info()
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], exc_info)
            calls.append(("app", [], exc_info))
        return [b"error page"]

    result = KoalaWSGIMiddleware(app, client=dry)(environ(), server_start_response)
    result.close()  # type: ignore[attr-defined]
    (ok, _, first_info), (error, headers, passed), (_, _, original) = calls
    assert (ok, first_info, error) == ("200 OK", None, "500 Internal Server Error")
    assert passed is original  # the very tuple, so the server can re-raise it
    assert [k for k, _ in headers].count("Set-Cookie") == 2  # the replacement keeps the cookies


# -- under a real server (wsgiref, the PEP's reference) ----------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def wsgiref_server(app: App) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, server_class=_Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_real_server_streams_chunks_before_the_generator_finishes(client: KoalaClient, collector: Collector) -> None:
    release = threading.Event()

    def app(env: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        env[ENVIRON_KEY].track("Stream Started")
        yield b"first\n"
        release.wait(10)
        yield b"second\n"

    with wsgiref_server(wrap(app, client)) as url, httpx.stream("GET", url, headers={"User-Agent": UA}) as r:
        assert r.headers["set-cookie"].startswith("ko_id=")
        lines = r.iter_lines()
        assert next(lines) == "first"
        assert not release.is_set()  # the first chunk arrived while the handler was still waiting
        assert client.stats.enqueued == 0
        release.set()
        assert list(lines) == ["second"]
    assert collector.wait_for(1)
    assert collector.requests()[0].headers["user-agent"] == UA


def test_real_server_replaces_the_response_when_start_response_gets_exc_info(
    client: KoalaClient, collector: Collector
) -> None:
    def app(env: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        env[ENVIRON_KEY].track("Render Failed")
        try:
            raise Boom("template error")
        except Boom:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"sorry"]

    def late(env: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"headers are out ")  # PEP 3333's write() callable still works through us
        env[ENVIRON_KEY].track("Late Failure")
        try:
            raise Boom("after headers")
        except Boom:
            start_response("500 Internal Server Error", [], sys.exc_info())  # the server re-raises
        yield b"never sent"

    routes = {"/early": wrap(app, client), "/late": KoalaWSGIMiddleware(late, client=client)}

    def router(env: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return routes[env["PATH_INFO"]](env, start_response)

    with wsgiref_server(router) as url:
        early = httpx.get(url + "/early")
        assert early.status_code == 500 and early.text == "sorry"
        assert [c.split("=")[0] for c in early.headers.get_list("set-cookie")] == ["ko_id", "ko_id_server"]
        late_response = httpx.get(url + "/late")
        assert late_response.status_code == 200 and late_response.text == "headers are out "
    assert collector.wait_for(2)
    assert sorted(e["event"] for e in collector.events()) == ["Late Failure", "Render Failed"]


def test_concurrent_requests_each_see_their_own_tracker(dry: KoalaClient) -> None:
    barrier = threading.Barrier(4, timeout=10)
    mismatches: list[str] = []

    def app(env: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        barrier.wait()  # all four requests are in their handlers at once
        if current_tracker() is not env[ENVIRON_KEY]:
            mismatches.append(env["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [env[ENVIRON_KEY].profile_id.encode()]

    with wsgiref_server(wrap(app, dry)) as url:
        results: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda i=i: results.append(httpx.get(f"{url}/{i}"))) for i in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
    assert time.monotonic() - started < 15 and not mismatches
    assert len({r.text for r in results}) == 4
    assert all(r.cookies["ko_id"] == r.text for r in results)
