"""Part 1: the middleware's cost per request, in process, with no server and no socket.

Method. The ASGI app is awaited directly with a prepared scope and no-op ``receive``/``send``
in a tight asyncio loop; the WSGI app (Flask, Django) is called with a prepared environ and a
no-op ``start_response``, its iterable consumed and closed. TestClient would cost far more
than the middleware and hide it.

Versions side by side: each case times the bare app and the app with the middleware of
several versions of the package, all in one process (see ``versions``): the first round's
(``FIRST_ROUND``), this round's starting point (``BEFORE``), the end of the round's first
two passes on main (``EARLIER_PASSES``), the working tree (``after``),
and an identical copy of the working tree as the noise control (its ratio to ``after``
should read 0.95-1.05x). Each round makes every variant afresh (a new parked client each),
warms it up, then interleaves them in short chunks (~5 ms of the bare app's work each, the
order rotated every chunk) with the garbage collector off, timing each chunk in process CPU
time. A variant's ratio is the median over rounds of (its CPU / the bare app's CPU) in the
same round, so drift of the machine cancels out.

For identify + track, HTTP belongs to the sender and is not counted: the client posts to a
loopback Koala that never answers, so the sender thread takes one batch and then sleeps, and the
rest stay queued. What is timed is the request path: tracker calls, building what the
hand-over needs, and the hand-over to the queue.

    python -m bench.inproc            # the part 1 table of bench/README.md
    python -m bench.inproc --quick    # fewer, shorter rounds
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import socket
import threading
import time
import types
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

from . import floor, versions
from .common import Row, check, machine_line, median, say

VISITOR_ID = "0f8fad5b-d9cb-4980-b0f2-4b2a1c6f5d3e"
HOST = "www.example.com"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"
SECRET = "bench-secret-key"
UNSEEN_VISITORS = 10_000  # more than the Cookie headers a middleware remembers (_cookie._SEEN_SIZE)

#: The end of the first round (2026-11-23), whose figures the identity round made dearer.
FIRST_ROUND = "c3a6fab"
#: Where this round started (main on 2026-12-03).
BEFORE = "8e9d052"
#: Main at the third pass's start (2026-12-04): issue 22's first two passes on the request
#: path, and the rest of the round (issues 18-24) merged.
EARLIER_PASSES = "b46d6ed"

#: The row of ``bench/floor.py``'s middlewares: koala's per-request duties and nothing else.
FLOOR = "floor: the same duties, nothing else"

Runner = Callable[[int], int]  # run n requests, return the process CPU nanoseconds they took
Clock = time.process_time_ns
#: Each chunk ends with this much sleep, inside its timing (a sleep costs no CPU): work a
#: chunk's requests woke on another thread (a sender building batches) is done then and
#: counted in this chunk, not in the next variant's. Timing a version that built batches on
#: the sender's thread (fad488f) without it, its identical copy read 0.90-1.19x of it.
SETTLE_SECONDS = 0.002


@dataclasses.dataclass
class Version:
    """One version of the package under its own name (see ``versions``)."""

    label: str
    title: str
    package: types.ModuleType

    def module(self, name: str) -> types.ModuleType | None:
        return versions.submodule(self.package, name)


def load_versions(before: str = BEFORE, earlier_passes: str = EARLIER_PASSES) -> list[Version]:
    return [
        Version("first", "first round", versions.load("first", FIRST_ROUND)),
        Version("before", "before", versions.load("before", before)),
        Version("earlier", "passes 1-2", versions.load("earlier", earlier_passes)),
        Version("after", "after", versions.load("after")),
        Version("copy", "after, identical copy", versions.load("copy")),
    ]


class ParkedKoala:
    """A loopback Koala that reads a request and never answers: the sender takes a batch and
    waits, so none of its work is timed. A socket, not a transport: every version's sender
    (httpx, libcurl, the pure-Python engine) posts to it alike."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            while True:
                connection, _ = self._listener.accept()
                self._held.append(connection)
                connection.recv(65536)
                self.reached.set()
        except OSError:  # closed
            pass

    def close(self) -> None:
        for held in (self._listener, *self._held):
            held.close()


def parked_client(version: Version) -> tuple[Any, ParkedKoala]:
    # One batch in flight: the sender takes it and parks. With the default 100, its work on
    # the first 100 batches (building their requests) ran during the timed loop, on the GIL.
    koala = ParkedKoala()
    client = version.package.KoalaClient(
        "pk_bench",
        api_url=koala.url,
        timeout=3600.0,
        max_in_flight=1,
        max_queue_batches=10_000_000,
        max_queue_bytes=1 << 40,
    )
    return client, koala


# -- the apps -------------------------------------------------------------------------------

CurrentTracker = Callable[[], Any]


def _record(tracker: Any) -> None:
    if tracker is not None:  # the bare app has no tracker; the check costs both the same
        tracker.identify("ada@example.com", {"plan": "pro"})
        tracker.track("Created Workspace", {"seats": 3})


def starlette_app(current: CurrentTracker, middleware: list[Middleware] | None = None) -> Starlette:
    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def tracked(request: Request) -> PlainTextResponse:
        _record(current())
        return PlainTextResponse("ok")

    async def login(request: Request) -> PlainTextResponse:
        request.session["user_id"] = 42
        return PlainTextResponse("ok")

    routes = [Route("/", home), Route("/track", tracked), Route("/login", login)]
    return Starlette(routes=routes, middleware=middleware)


def flask_app(current: CurrentTracker) -> flask.Flask:
    app = flask.Flask("bench")

    @app.route("/")
    def index() -> str:
        return "ok"

    @app.route("/track")
    def track() -> str:
        _record(current())
        return "ok"

    return app


def django_handler(middleware: list[str], koala: dict[str, Any] | None) -> Any:
    """A Django WSGI handler with only ``middleware`` (Django reads the setting, and the
    Koala middleware ``settings.KOALA``, when the handler is made)."""
    import django
    from django.conf import settings

    if not settings.configured:
        from django.http import HttpResponse
        from django.urls import path

        def home(request: Any) -> HttpResponse:
            return HttpResponse("ok")

        urls = types.ModuleType("bench_django_urls")  # hashable, as Django's resolver cache needs
        urls.urlpatterns = [path("", home)]  # type: ignore[attr-defined]
        settings.configure(
            DEBUG=False,
            ALLOWED_HOSTS=[HOST],
            SECRET_KEY=SECRET,
            ROOT_URLCONF=urls,
            MIDDLEWARE=[],
            INSTALLED_APPS=[],
            USE_TZ=True,
        )
        django.setup()
    from django.core.handlers.wsgi import WSGIHandler

    settings.MIDDLEWARE = middleware
    settings.KOALA = koala or {}
    return WSGIHandler()


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
        start = Clock()
        for index in range(n):
            await app({**scopes[index % count], "state": {}}, receive, send)
        time.sleep(SETTLE_SECONDS)
        return Clock() - start

    return lambda n: loop.run_until_complete(many(n))


def wsgi_runner(app: Any, environ: dict[str, Any], others: list[dict[str, Any]] | None = None) -> Runner:
    def write(data: bytes) -> None:
        pass

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return write

    environs = others or [environ]
    count = len(environs)

    def many(n: int) -> int:
        start = Clock()
        for index in range(n):
            body = app(dict(environs[index % count]), start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
        time.sleep(SETTLE_SECONDS)
        return Clock() - start

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


# -- cases ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One app to time. ``make`` builds a runner (and a cleanup) for one round."""

    name: str
    make: Callable[[], tuple[Runner, Callable[[], None]]]
    is_baseline: bool = False
    version: str | None = None  # the Version label, for the package's own rows
    target: float | None = None  # at most this ratio to the baseline (the working tree's row)


@dataclasses.dataclass
class Case:
    part: str
    title: str
    variants: list[Variant]
    results: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # ns per request
    ratios: dict[str, list[float]] = dataclasses.field(default_factory=dict)


def _nothing() -> None:
    pass


def _stopper(client: Any, koala: ParkedKoala | None) -> Callable[[], None]:
    """Shut a parked client down at once (its queued batches are dropped on purpose), then
    its parked Koala."""
    if client is None or koala is None:
        return _nothing

    def stop() -> None:
        client.shutdown(timeout=0)
        koala.close()

    return stop


def session_cookie(loop: asyncio.AbstractEventLoop) -> str:
    """A valid signed session cookie, as a returning logged-in user would send it."""
    app = starlette_app(_no_tracker, [Middleware(SessionMiddleware, secret_key=SECRET)])
    headers = asgi_response_headers(app, asgi_scope("/login", None), loop)
    value = next(v.decode() for k, v in headers if k == b"set-cookie")
    return value.split(";", 1)[0]


def _no_tracker() -> None:
    return None


MakeRunner = Callable[[], tuple[Runner, Callable[[], None]]]


def build_cases(loop: asyncio.AbstractEventLoop, all_versions: list[Version], django: bool = True) -> list[Case]:
    # A returning visitor holds both cookies: ko_id and its server-kept copy (no Set-Cookie).
    returning = f"ko_id={VISITOR_ID}; ko_id_server={VISITOR_ID}; _ga=GA1.2.1234567890.1700000000"
    # More visitors than the middleware remembers Cookie headers of: every request is a miss.
    unseen = [
        f"ko_id={v}; ko_id_server={v}; _ga=GA1.2.1234567890.1700000000"
        for v in (uuid.uuid4() for _ in range(UNSEEN_VISITORS))
    ]
    session = session_cookie(loop)
    returning_with_session = f"{returning}; {session}"
    current = all_versions[-1].package.current_tracker  # returns None in a bare app

    def asgi(
        version: Version | None,
        path: str,
        cookie: str | None,
        expect_cookie: bool | None = None,
        expect_batches: int = 0,
        others: list[str] | None = None,
    ) -> MakeRunner:
        def make() -> tuple[Runner, Callable[[], None]]:
            if version is None:
                client, transport, app = None, None, starlette_app(current)
            else:
                client, transport = parked_client(version)
                asgi_module = version.module("asgi")
                assert asgi_module is not None
                middleware = [Middleware(asgi_module.KoalaASGIMiddleware, client=client)]
                app = starlette_app(version.package.current_tracker, middleware)
            scope = asgi_scope(path, cookie)
            headers = asgi_response_headers(app, scope, loop)
            _expect(headers, b"set-cookie", b"ko_id", expect_cookie, client, transport, expect_batches)
            scopes = [asgi_scope(path, other) for other in others] if others else None
            return asgi_runner(app, scope, loop, scopes), _stopper(client, transport)

        return make

    def wsgi(
        version: Version | None,
        path: str,
        cookie: str | None,
        expect_cookie: bool | None = None,
        expect_batches: int = 0,
        others: list[str] | None = None,
    ) -> MakeRunner:
        def make() -> tuple[Runner, Callable[[], None]]:
            if version is None:
                client, transport, app = None, None, flask_app(current)
            else:
                client, transport = parked_client(version)
                app = flask_app(version.package.current_tracker)
                wsgi_module = version.module("wsgi")
                assert wsgi_module is not None
                app.wsgi_app = wsgi_module.KoalaWSGIMiddleware(app.wsgi_app, client=client)  # type: ignore[method-assign]
            environ = wsgi_environ(path, cookie)
            headers = wsgi_response_headers(app, environ)
            _expect(headers, "set-cookie", "ko_id", expect_cookie, client, transport, expect_batches)
            environs = [wsgi_environ(path, other) for other in others] if others else None
            return wsgi_runner(app, environ, environs), _stopper(client, transport)

        return make

    def on_django(version: Version | None, cookie: str, expect_cookie: bool | None = None) -> MakeRunner:
        def make() -> tuple[Runner, Callable[[], None]]:
            if version is None:
                client, transport, handler = None, None, django_handler([], None)
            else:
                client, transport = parked_client(version)
                handler = django_handler([f"{version.package.__name__}.django.KoalaMiddleware"], {"client": client})
            environ = wsgi_environ("/", cookie)
            headers = wsgi_response_headers(handler, environ)
            _expect(headers, "Set-Cookie", "ko_id", expect_cookie, client, transport, 0)
            return wsgi_runner(handler, environ), _stopper(client, transport)

        return make

    def session_variant(name: str, cookie: str) -> Variant:
        def make() -> tuple[Runner, Callable[[], None]]:
            app = starlette_app(current, [Middleware(SessionMiddleware, secret_key=SECRET)])
            scope = asgi_scope("/", cookie)
            headers = asgi_response_headers(app, scope, loop)
            _expect(headers, b"set-cookie", b"session=", False, None, None, 0)
            return asgi_runner(app, scope, loop), _nothing

        return Variant(name, make)

    def floor_asgi(cookie: str, path: str = "/") -> Variant:
        def make() -> tuple[Runner, Callable[[], None]]:
            app = starlette_app(floor.current, [Middleware(floor.FloorASGIMiddleware)])
            scope = asgi_scope(path, cookie)
            asgi_response_headers(app, scope, loop)
            return asgi_runner(app, scope, loop), _nothing

        return Variant(FLOOR, make)

    def floor_wsgi(cookie: str, path: str = "/") -> Variant:
        def make() -> tuple[Runner, Callable[[], None]]:
            app = flask_app(floor.current)
            app.wsgi_app = floor.FloorWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
            environ = wsgi_environ(path, cookie)
            wsgi_response_headers(app, environ)
            return wsgi_runner(app, environ), _nothing

        return Variant(FLOOR, make)

    def each_version(target: float | None, make: Callable[[Version], MakeRunner], needs: str) -> list[Variant]:
        return [
            Variant(v.title, make(v), version=v.label, target=target if v.label == "after" else None)
            for v in all_versions
            if v.module(needs) is not None
        ]

    cases = [
        Case(
            "1a",
            "Starlette, returning visitor",
            [
                Variant("bare", asgi(None, "/", returning_with_session), is_baseline=True),
                *each_version(1.18, lambda v: asgi(v, "/", returning_with_session, False), "asgi"),
                session_variant("SessionMiddleware, returning session", returning_with_session),
                session_variant("SessionMiddleware, no session", returning),
                floor_asgi(returning_with_session),
            ],
        ),
        Case(
            "1a",
            "Starlette, returning visitors, each header unseen",
            [
                Variant("bare", asgi(None, "/", returning, others=unseen), is_baseline=True),
                *each_version(None, lambda v: asgi(v, "/", returning, False, others=unseen), "asgi"),
            ],
        ),
        Case(
            "1b",
            "Starlette, new visitor",
            [
                Variant("bare", asgi(None, "/", None), is_baseline=True),
                *each_version(1.55, lambda v: asgi(v, "/", None, True), "asgi"),
            ],
        ),
        Case(
            "1c",
            "Starlette, identify + track",
            [
                Variant("bare", asgi(None, "/track", returning), is_baseline=True),
                *each_version(2.15, lambda v: asgi(v, "/track", returning, False, 1), "asgi"),
                floor_asgi(returning, "/track"),
            ],
        ),
        Case(
            "1a",
            "Flask, returning visitor",
            [
                Variant("bare", wsgi(None, "/", returning), is_baseline=True),
                *each_version(1.07, lambda v: wsgi(v, "/", returning, False), "wsgi"),
                floor_wsgi(returning),
            ],
        ),
        Case(
            "1a",
            "Flask, returning visitors, each header unseen",
            [
                Variant("bare", wsgi(None, "/", returning, others=unseen), is_baseline=True),
                *each_version(None, lambda v: wsgi(v, "/", returning, False, others=unseen), "wsgi"),
            ],
        ),
        Case(
            "1c",
            "Flask, identify + track",
            [
                Variant("bare", wsgi(None, "/track", returning), is_baseline=True),
                *each_version(1.45, lambda v: wsgi(v, "/track", returning, False, 1), "wsgi"),
                floor_wsgi(returning, "/track"),
            ],
        ),
    ]
    if django:
        cases.append(
            Case(
                "1a",
                "Django, returning visitor",
                [
                    Variant("bare", on_django(None, returning), is_baseline=True),
                    *each_version(1.08, lambda v: on_django(v, returning, False), "django"),
                ],
            )
        )
    return cases


def _expect(
    headers: list[tuple[Any, Any]],
    name: Any,
    prefix: Any,
    expect_cookie: bool | None,
    client: Any,
    transport: ParkedKoala | None,
    batches: int,
) -> None:
    """Refuse to time a variant that does not do what its row claims."""
    if expect_cookie is not None:
        has = any(k.lower() == name.lower() and v.startswith(prefix) for k, v in headers)
        if has != expect_cookie:
            raise RuntimeError(f"expected Set-Cookie {prefix!r}: {expect_cookie}, got headers {headers}")
    if client is not None:
        enqueued = client.stats.enqueued
        if enqueued != batches:
            raise RuntimeError(f"expected {batches} batch(es) handed over after one request, got {enqueued}")
        if batches:
            # The sender thread (started by the first batch) parks on it: starting it costs
            # milliseconds of CPU, which must not land in a timed chunk.
            assert transport is not None
            if not transport.reached.wait(10):
                raise RuntimeError("the sender never took its first batch")


# -- the loop -------------------------------------------------------------------------------------


def calibrate(runner: Runner, seconds: float) -> int:
    """How many calls take about ``seconds`` of CPU (at least 20)."""
    n = 20
    while True:
        took = runner(n) / 1e9
        if took >= seconds / 2 or n >= 1_000_000:
            return max(20, int(n * seconds / max(took, 1e-9)))
        n *= 2


def run_case(case: Case, rounds: int, chunks: int, chunk_seconds: float) -> None:
    """Time every variant of ``case`` in ``rounds`` rounds of ``chunks`` interleaved chunks."""
    baseline = next(v for v in case.variants if v.is_baseline)
    runner, cleanup = baseline.make()
    runner(200)
    calls = calibrate(runner, chunk_seconds)
    cleanup()
    case.results = {v.name: [] for v in case.variants}
    case.ratios = {v.name: [] for v in case.variants}
    for index in range(rounds):
        made = [(variant, *variant.make()) for variant in case.variants]
        spent = {variant.name: 0 for variant in case.variants}
        try:
            for _variant, runner, _cleanup in made:
                runner(max(20, calls // 4))  # warm up: caches, the allocator
            gc.collect()
            gc.disable()
            for chunk in range(chunks):
                shift = (index + chunk) % len(made)
                for variant, runner, _cleanup in made[shift:] + made[:shift]:
                    spent[variant.name] += runner(calls)
        finally:
            gc.enable()
            for _variant, _runner, cleanup in made:
                cleanup()
            gc.collect()
        base = spent[baseline.name]
        for name, ns in spent.items():
            case.results[name].append(ns / (calls * chunks))
            case.ratios[name].append(ns / base)


def run_cases(
    quick: bool = False, before: str = BEFORE, only: str | None = None, earlier_passes: str = EARLIER_PASSES
) -> list[Case]:
    logging.getLogger("koala_middleware").setLevel(logging.ERROR)  # parked clients' shutdown
    rounds, chunks, chunk_seconds = (5, 4, 0.003) if quick else (11, 8, 0.005)
    loop = asyncio.new_event_loop()
    try:
        cases = [
            case
            for case in build_cases(loop, load_versions(before, earlier_passes))
            if only is None or only in case.title
        ]
        for case in cases:
            say(f"in process: {case.part} {case.title} ({rounds} rounds of {chunks} chunks)")
            run_case(case, rounds, chunks, chunk_seconds)
    finally:
        loop.close()
    return cases


def run(quick: bool = False) -> list[Row]:
    rows: list[Row] = []
    cases = run_cases(quick)
    for case in cases:
        rows.extend(case_rows(case))
    rows.append(noise_row(cases))
    from . import memory

    rows.extend(memory.rows())
    return rows


def case_rows(case: Case) -> Iterator[Row]:
    """The rows of ``bench/run.py``'s table: the bare app, the working tree's middleware as
    ``koala`` (the earlier versions' ratios in its text: ``part1_table`` shows them side
    by side), and the yardsticks. ``scripts/bench_plots.py`` draws the rows with a ratio."""
    base_name = next(v.name for v in case.variants if v.is_baseline)
    base_us = median(case.results[base_name]) / 1000
    yield Row(case.part, f"{case.title}: bare", f"{base_us:.1f} us/request", 1.0, "", None)
    earlier = "; ".join(
        f"{variant.name} {median(case.ratios[variant.name]):.2f}x"
        for variant in case.variants
        if variant.version in ("first", "before", "earlier")
    )
    for variant in case.variants:
        if variant.is_baseline or variant.version in ("first", "before", "earlier", "copy"):
            continue
        ratio = median(case.ratios[variant.name])
        us = median(case.results[variant.name]) / 1000
        target = f"<= {variant.target:.2f}x" if variant.target else ""
        met = check(ratio, variant.target) if variant.target else None
        measured = f"{us:.1f} us/request (+{us - base_us:.1f} us)"
        if variant.version == "after" and earlier:
            measured += f" ({earlier})"
        name = "koala" if variant.version == "after" else variant.name
        yield Row(case.part, f"{case.title}: {name}", measured, ratio, target, met)


def _copy_over_after(case: Case) -> list[float]:
    """Per round: the identical copy's CPU over the working tree's."""
    after = next(v.name for v in case.variants if v.version == "after")
    copy = next(v.name for v in case.variants if v.version == "copy")
    return [c / a for c, a in zip(case.results[copy], case.results[after], strict=True)]


def noise_row(cases: list[Case]) -> Row:
    """The identical copy against the working tree: median of each case's median, and the
    widest case median seen (a harness that reads outside 0.95-1.05x is not to be trusted)."""
    medians = [median(_copy_over_after(case)) for case in cases]
    low, high = min(medians), max(medians)
    return Row(
        "1",
        "noise control: an identical copy of koala / koala, median of each case",
        f"{median(medians):.2f}x ({low:.2f}x-{high:.2f}x)",
        None,  # no bar in the plots: it measures the harness, not the middleware
        "0.95x-1.05x",
        low >= 0.95 and high <= 1.05,
    )


def part1_table(cases: list[Case]) -> str:
    """The README's part 1 table: each case's ratio for each version, side by side."""
    lines = [
        "| case | bare | first round | before | after, passes 1-2 | after, pass 3 | target | met "
        "| noise (copy / after) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for case in cases:
        base_name = next(v.name for v in case.variants if v.is_baseline)
        base_us = median(case.results[base_name]) / 1000
        cells: dict[str, str] = {}
        target = ""
        met = "-"
        for variant in case.variants:
            if variant.version is None:
                continue
            ratio = median(case.ratios[variant.name])
            added = (median(case.results[variant.name]) - median(case.results[base_name])) / 1000
            cells[variant.version] = f"{ratio:.2f}x (+{added:.1f} us)"
            if variant.target is not None:
                target = f"<= {variant.target:.2f}x"
                met = "yes" if ratio <= variant.target else "**no**"
        noise = _copy_over_after(case)
        noise_cell = f"{median(noise):.2f}x ({min(noise):.2f}-{max(noise):.2f})"
        lines.append(
            f"| {case.title} | {base_us:.1f} us | {cells.get('first', 'n/a')} | {cells.get('before', 'n/a')} "
            f"| {cells.get('earlier', 'n/a')} | {cells.get('after', 'n/a')} | {target} | {met} | {noise_cell} |"
        )
    lines.extend(
        f"| {case.title}: {variant.name} (for scale) | | | | | {median(case.ratios[variant.name]):.2f}x | | | |"
        for case in cases
        for variant in case.variants
        if variant.version is None and not variant.is_baseline
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="bench part 1: versions side by side")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--before", default=BEFORE, help=f"the commit of the 'before' column (default {BEFORE})")
    parser.add_argument(
        "--earlier-passes",
        default=EARLIER_PASSES,
        help=f"the commit of the 'after, passes 1-2' column (default {EARLIER_PASSES})",
    )
    parser.add_argument("--only", help="only the cases whose title contains this, e.g. 'Flask'")
    args = parser.parse_args()
    started = time.monotonic()
    cases = run_cases(args.quick, args.before, args.only, args.earlier_passes)
    print(f"Machine: {machine_line()}.")
    print(f"Run: `python -m bench.inproc{' --quick' if args.quick else ''}` ({time.monotonic() - started:.0f} s).")
    print()
    print(part1_table(cases))


if __name__ == "__main__":
    main()
