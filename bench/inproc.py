"""Part 1: the middleware's cost per request, in process, with no server and no socket.

The ASGI app is awaited directly with a prepared scope and no-op ``receive``/``send`` in a
tight asyncio loop; the WSGI app is called with a prepared environ and a no-op
``start_response``, its iterable consumed and closed. TestClient would cost far more than
the middleware and hide it. Each round times every variant of a case back to back (order
rotated), and a variant's ratio is the median over rounds of (variant / bare) in the same
round, so drift of the machine cancels out.

For identify + track, HTTP belongs to the sender and is not counted: the client's transport
parks every request forever, so the sender thread takes one batch and then sleeps, and the
rest stay queued. What is timed is the request path: tracker calls, building the batch and
the hand-over to the queue. Each round gets a fresh client, shut down after it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import flask
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from koala_middleware import KoalaClient, current_tracker
from koala_middleware.asgi import KoalaASGIMiddleware
from koala_middleware.wsgi import KoalaWSGIMiddleware

from .common import Row, check, median, say

VISITOR_ID = "0f8fad5b-d9cb-4980-b0f2-4b2a1c6f5d3e"
HOST = "www.example.com"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"
SECRET = "bench-secret-key"
UNSEEN_VISITORS = 10_000  # more than the Cookie headers a middleware remembers (_cookie._SEEN_SIZE)

Runner = Callable[[int], int]  # run n requests, return the nanoseconds they took


class ParkedKoala:
    """A loopback Koala that reads a request and never answers: the sender takes a batch and
    waits, so none of its work is timed."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            connection, _ = self._listener.accept()
            self._held.append(connection)
            connection.recv(65536)
            self.reached.set()


_parked_koalas: dict[int, ParkedKoala] = {}


def settle(client: KoalaClient) -> None:
    """Wait until the sender thread (started by the first batch) has parked on its batch:
    starting it costs milliseconds of CPU, which must not land in a timed loop."""
    if not _parked_koalas[id(client)].reached.wait(10):
        raise RuntimeError("the sender never took its first batch")


def parked_client() -> KoalaClient:
    # One batch in flight: the sender takes it and parks. With the default 100, its work on
    # the first 100 batches (building their requests) ran during the timed loop, on the GIL.
    koala = ParkedKoala()
    client = _parked_client(koala.url)
    _parked_koalas[id(client)] = koala
    return client


def _parked_client(url: str) -> KoalaClient:
    return KoalaClient(
        "pk_bench",
        api_url=url,
        timeout=3600.0,
        max_in_flight=1,
        max_queue_batches=10_000_000,
        max_queue_bytes=1 << 40,
    )


# -- the apps -------------------------------------------------------------------------------


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def tracked(request: Request) -> PlainTextResponse:
    tracker = current_tracker()
    if tracker is not None:  # the bare app has no tracker; the check costs both the same
        tracker.identify("ada@example.com", {"plan": "pro"})
        tracker.track("Created Workspace", {"seats": 3})
    return PlainTextResponse("ok")


async def login(request: Request) -> PlainTextResponse:
    request.session["user_id"] = 42
    return PlainTextResponse("ok")


def starlette_app(middleware: list[Middleware] | None = None) -> Starlette:
    routes = [Route("/", home), Route("/track", tracked), Route("/login", login)]
    return Starlette(routes=routes, middleware=middleware)


def flask_app() -> flask.Flask:
    app = flask.Flask("bench")

    @app.route("/")
    def index() -> str:
        return "ok"

    @app.route("/track")
    def track() -> str:
        tracker = current_tracker()
        if tracker is not None:
            tracker.identify("ada@example.com", {"plan": "pro"})
            tracker.track("Created Workspace", {"seats": 3})
        return "ok"

    return app


# -- driving them -----------------------------------------------------------------------------


def asgi_scope(path: str, cookie: str | None) -> dict[str, Any]:
    headers = [
        (b"host", HOST.encode()),
        (b"user-agent", USER_AGENT.encode()),
        (b"accept", b"text/html,application/xhtml+xml"),
        (b"accept-language", b"en-US,en;q=0.9"),
    ]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("203.0.113.7", 50123),
        "server": (HOST, 443),
        "state": {},  # as uvicorn sends it: a copy of the lifespan state, per request
    }


def wsgi_environ(path: str, cookie: str | None) -> dict[str, Any]:
    import io
    import sys

    environ = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": HOST,
        "SERVER_PORT": "443",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "203.0.113.7",
        "HTTP_HOST": HOST,
        "HTTP_USER_AGENT": USER_AGENT,
        "HTTP_ACCEPT": "text/html,application/xhtml+xml",
        "HTTP_ACCEPT_LANGUAGE": "en-US,en;q=0.9",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if cookie:
        environ["HTTP_COOKIE"] = cookie
    return environ


_REQUEST = {"type": "http.request", "body": b"", "more_body": False}


def asgi_runner(
    app: Any, scope: dict[str, Any], loop: asyncio.AbstractEventLoop, others: list[dict[str, Any]] | None = None
) -> Runner:
    """Run ``n`` requests: ``scope`` each time, or ``others`` in turn (other visitors)."""

    async def receive() -> dict[str, Any]:
        return _REQUEST

    async def send(message: dict[str, Any]) -> None:
        pass

    scopes = others or [scope]
    count = len(scopes)

    async def many(n: int) -> int:
        start = time.perf_counter_ns()
        for index in range(n):
            await app({**scopes[index % count], "state": {}}, receive, send)
        return time.perf_counter_ns() - start

    return lambda n: loop.run_until_complete(many(n))


def wsgi_runner(app: Any, environ: dict[str, Any], others: list[dict[str, Any]] | None = None) -> Runner:
    def write(data: bytes) -> None:
        pass

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return write

    environs = others or [environ]
    count = len(environs)

    def many(n: int) -> int:
        start = time.perf_counter_ns()
        for index in range(n):
            body = app(dict(environs[index % count]), start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return time.perf_counter_ns() - start

    return many


def asgi_response_headers(
    app: Any, scope: dict[str, Any], loop: asyncio.AbstractEventLoop
) -> list[tuple[bytes, bytes]]:
    """Run one request and return its response headers (to check a variant does its job)."""
    seen: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return _REQUEST

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            seen.append(message)

    loop.run_until_complete(app({**scope, "state": {}}, receive, send))
    return list(seen[0].get("headers") or [])


def wsgi_response_headers(app: Any, environ: dict[str, Any]) -> list[tuple[str, str]]:
    seen: list[list[tuple[str, str]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen.append(headers)
        return lambda data: None

    body = app(dict(environ), start_response)
    for _chunk in body:
        pass
    getattr(body, "close", lambda: None)()
    return seen[0]


# -- cases --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One app to time. ``make`` builds a runner (and a cleanup) for one round."""

    name: str
    make: Callable[[], tuple[Runner, Callable[[], None]]]
    is_baseline: bool = False
    target: float | None = None  # at most this ratio to the baseline
    below: str | None = None  # ...and below this other variant's ratio


@dataclasses.dataclass
class Case:
    part: str
    title: str
    variants: list[Variant]
    results: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # ns per request
    ratios: dict[str, list[float]] = dataclasses.field(default_factory=dict)


def _nothing() -> None:
    pass


def _stopper(client: KoalaClient | None) -> Callable[[], None]:
    """Shut a parked client down at once: its queued batches are dropped on purpose."""
    return (lambda: client.shutdown(timeout=0)) if client is not None else _nothing


def session_cookie(loop: asyncio.AbstractEventLoop) -> str:
    """A valid signed session cookie, as a returning logged-in user would send it."""
    app = starlette_app([Middleware(SessionMiddleware, secret_key=SECRET)])
    headers = asgi_response_headers(app, asgi_scope("/login", None), loop)
    value = next(v.decode() for k, v in headers if k == b"set-cookie")
    return value.split(";", 1)[0]


def build_cases(loop: asyncio.AbstractEventLoop) -> list[Case]:
    # A returning visitor holds both cookies: ko_id and its server-kept copy (no Set-Cookie).
    returning = f"ko_id={VISITOR_ID}; ko_id_server={VISITOR_ID}; _ga=GA1.2.1234567890.1700000000"
    # More visitors than the middleware remembers Cookie headers of: every request is a miss.
    unseen = [
        f"ko_id={v}; ko_id_server={v}; _ga=GA1.2.1234567890.1700000000"
        for v in (uuid.uuid4() for _ in range(UNSEEN_VISITORS))
    ]
    session = session_cookie(loop)
    returning_with_session = f"{returning}; {session}"

    def asgi(
        middleware: Callable[[KoalaClient], list[Middleware]] | None,
        path: str,
        cookie: str | None,
        expect_cookie: bool | None = None,
        expect_batches: int = 0,
        others: list[str] | None = None,
    ) -> Callable[[], tuple[Runner, Callable[[], None]]]:
        def make() -> tuple[Runner, Callable[[], None]]:
            client = parked_client() if middleware is not None else None
            app = starlette_app(middleware(client) if client is not None and middleware else None)
            scope = asgi_scope(path, cookie)
            headers = asgi_response_headers(app, scope, loop)
            _expect(headers, b"set-cookie", b"ko_id", expect_cookie, client, expect_batches)
            scopes = [asgi_scope(path, other) for other in others] if others else None
            return asgi_runner(app, scope, loop, scopes), _stopper(client)

        return make

    def wsgi(
        wrapped: bool,
        path: str,
        cookie: str | None,
        expect_cookie: bool | None = None,
        expect_batches: int = 0,
        others: list[str] | None = None,
    ) -> Callable[[], tuple[Runner, Callable[[], None]]]:
        def make() -> tuple[Runner, Callable[[], None]]:
            app = flask_app()
            client = parked_client() if wrapped else None
            if client is not None:
                app.wsgi_app = KoalaWSGIMiddleware(app.wsgi_app, client=client)  # type: ignore[method-assign]
            environ = wsgi_environ(path, cookie)
            headers = wsgi_response_headers(app, environ)
            _expect(headers, "set-cookie", "ko_id", expect_cookie, client, expect_batches)
            environs = [wsgi_environ(path, other) for other in others] if others else None
            return wsgi_runner(app, environ, environs), _stopper(client)

        return make

    def koala(client: KoalaClient) -> list[Middleware]:
        return [Middleware(KoalaASGIMiddleware, client=client)]

    def sessions(client: KoalaClient | None) -> list[Middleware]:
        return [Middleware(SessionMiddleware, secret_key=SECRET)]

    def session_variant(name: str, cookie: str, sets_cookie: bool) -> Variant:
        def make() -> tuple[Runner, Callable[[], None]]:
            app = starlette_app(sessions(None))
            scope = asgi_scope("/", cookie)
            headers = asgi_response_headers(app, scope, loop)
            _expect(headers, b"set-cookie", b"session=", sets_cookie, None, 0)
            return asgi_runner(app, scope, loop), _nothing

        return Variant(name, make)

    return [
        Case(
            "1a",
            "Starlette, returning visitor",
            [
                Variant("bare", asgi(None, "/", returning_with_session), is_baseline=True),
                Variant(
                    "koala",
                    asgi(koala, "/", returning_with_session, expect_cookie=False),
                    target=1.25,
                    below="SessionMiddleware, returning session",
                ),
                session_variant("SessionMiddleware, returning session", returning_with_session, False),
                session_variant("SessionMiddleware, no session", returning, False),
            ],
        ),
        Case(
            "1a",
            "Starlette, returning visitors, each header unseen",
            [
                Variant("bare", asgi(None, "/", returning, others=unseen), is_baseline=True),
                Variant("koala", asgi(koala, "/", returning, expect_cookie=False, others=unseen)),
            ],
        ),
        Case(
            "1b",
            "Starlette, new visitor",
            [
                Variant("bare", asgi(None, "/", None), is_baseline=True),
                Variant("koala", asgi(koala, "/", None, expect_cookie=True), target=1.6),
            ],
        ),
        Case(
            "1c",
            "Starlette, identify + track",
            [
                Variant("bare", asgi(None, "/track", returning), is_baseline=True),
                Variant("koala", asgi(koala, "/track", returning, expect_cookie=False, expect_batches=1), target=2.5),
            ],
        ),
        Case(
            "1a",
            "Flask, returning visitor",
            [
                Variant("bare", wsgi(False, "/", returning), is_baseline=True),
                Variant("koala", wsgi(True, "/", returning, expect_cookie=False), target=1.10),
            ],
        ),
        Case(
            "1a",
            "Flask, returning visitors, each header unseen",
            [
                Variant("bare", wsgi(False, "/", returning, others=unseen), is_baseline=True),
                Variant("koala", wsgi(True, "/", returning, expect_cookie=False, others=unseen)),
            ],
        ),
        Case(
            "1b",
            "Flask, new visitor",
            [
                Variant("bare", wsgi(False, "/", None), is_baseline=True),
                Variant("koala", wsgi(True, "/", None, expect_cookie=True)),
            ],
        ),
        Case(
            "1c",
            "Flask, identify + track",
            [
                Variant("bare", wsgi(False, "/track", returning), is_baseline=True),
                Variant("koala", wsgi(True, "/track", returning, expect_cookie=False, expect_batches=1), target=1.3),
            ],
        ),
    ]


def _expect(
    headers: list[tuple[Any, Any]],
    name: Any,
    prefix: Any,
    expect_cookie: bool | None,
    client: KoalaClient | None,
    batches: int,
) -> None:
    """Refuse to time a variant that does not do what its row claims."""
    if expect_cookie is not None:
        has = any(k.lower() == name and v.startswith(prefix) for k, v in headers)
        if has != expect_cookie:
            raise RuntimeError(f"expected Set-Cookie {prefix!r}: {expect_cookie}, got headers {headers}")
    if client is not None:
        enqueued = client.stats.enqueued
        if enqueued != batches:
            raise RuntimeError(f"expected {batches} batch(es) handed over after one request, got {enqueued}")
        if batches:
            settle(client)


# -- the loop -------------------------------------------------------------------------------------


def calibrate(runner: Runner, seconds: float) -> int:
    """How many calls take about ``seconds`` (at least 200)."""
    n = 50
    while True:
        took = runner(n) / 1e9
        if took >= seconds / 4 or n >= 1_000_000:
            return max(200, int(n * seconds / max(took, 1e-9)))
        n *= 4


def run_case(case: Case, rounds: int, seconds: float) -> None:
    """Time every variant of ``case`` ``rounds`` times, in rotating order."""
    baseline = next(v for v in case.variants if v.is_baseline)
    runner, cleanup = baseline.make()
    runner(200)
    calls = calibrate(runner, seconds)
    cleanup()
    case.results = {v.name: [] for v in case.variants}
    case.ratios = {v.name: [] for v in case.variants}
    for index in range(rounds):
        shift = index % len(case.variants)
        order = case.variants[shift:] + case.variants[:shift]
        this_round: dict[str, float] = {}
        for variant in order:
            runner, cleanup = variant.make()
            try:
                runner(max(50, calls // 10))  # warm up: caches, the sender thread, the allocator
                gc.collect()
                this_round[variant.name] = runner(calls) / calls
            finally:
                cleanup()
        base = this_round[baseline.name]
        for name, ns in this_round.items():
            case.results[name].append(ns)
            case.ratios[name].append(ns / base)


def run(quick: bool = False) -> list[Row]:
    logging.getLogger("koala_middleware").setLevel(logging.ERROR)  # parked clients' shutdown
    rounds, seconds = (5, 0.03) if quick else (15, 0.08)
    loop = asyncio.new_event_loop()
    rows: list[Row] = []
    try:
        cases = build_cases(loop)
        for case in cases:
            say(f"in process: {case.part} {case.title} ({rounds} rounds)")
            run_case(case, rounds, seconds)
            rows.extend(case_rows(case))
    finally:
        loop.close()
    return rows


def case_rows(case: Case) -> Iterator[Row]:
    base_name = next(v.name for v in case.variants if v.is_baseline)
    base_us = median(case.results[base_name]) / 1000
    yield Row(case.part, f"{case.title}: bare", f"{base_us:.1f} us/request", 1.0, "", None)
    for variant in case.variants:
        if variant.is_baseline:
            continue
        ratio = median(case.ratios[variant.name])
        us = median(case.results[variant.name]) / 1000
        added = us - base_us
        target = f"<= {variant.target:.2f}x" if variant.target else ""
        met = check(ratio, variant.target) if variant.target else None
        if variant.below:
            peer = median(case.ratios[variant.below])
            target += f" and < {variant.below} ({peer:.2f}x)"
            met = bool(met) and ratio < peer
        yield Row(
            case.part, f"{case.title}: {variant.name}", f"{us:.1f} us/request (+{added:.1f} us)", ratio, target, met
        )
