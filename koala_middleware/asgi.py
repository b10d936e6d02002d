"""Koala for ASGI apps (FastAPI, Starlette, any ASGI 3 app). Pure ASGI: no BaseHTTPMiddleware.

Each HTTP request gets a :class:`~koala_middleware.Tracker` in ``scope["koala.tracker"]``,
``request.state.koala`` and ``current_tracker()`` (also in sync handlers and dependencies
that run in a thread pool: they inherit the request's context). What it recorded is handed
to the client when the app returns: after the last body chunk went out, and after any
background tasks, which may track too.

Websockets may read the visitor id (``scope["koala.visitor_id"]``, None unless the visitor
already has a valid ``ko_id`` and may be tracked) but never get a cookie or a tracker.
Lifespan passes through; on shutdown, pending batches are flushed (within
``shutdown_timeout``) before the server is told the app has stopped. That flush is what
delivers them when the server stops: uvicorn, for one, ends its process on SIGTERM by the
signal itself, so no exit hook runs after it. Apps that do not speak lifespan get it
spoken for them, for the flush's sake.

The visitor IP is ``scope["client"]``: behind a proxy, run the server with its proxy-headers
handling (``uvicorn --proxy-headers --forwarded-allow-ips=<proxy>``); a raw
``X-Forwarded-For`` is client-controlled and never read here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from ._client import KoalaClient
from ._pixel import asgi_proxy
from ._request import RequestInfo, RequestReader, client_ip, header_text, path_text, sec_gpc
from ._tracker import STARTED, RequestTracker, bind, unbind
from ._visit import TRACKER_KEY, VisitorOptions, Visits, configure

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["SCOPE_KEY", "VISITOR_ID_KEY", "KoalaASGIMiddleware", "request_info"]


async def _in_thread(function: Callable[[], object]) -> None:
    """Run blocking ``function`` (a flush, a sync-mode post) off the event loop: asyncio's
    default executor; under trio, anyio's threads (anyio comes with every trio-capable
    framework), imported only then."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio
        import anyio.to_thread

        await anyio.to_thread.run_sync(function)
        return
    await loop.run_in_executor(None, function)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("koala_middleware")

LOG_SHUTDOWN_FLUSH_TIMEOUT = "lifespan shutdown: batches still pending after %.1fs; continuing the shutdown"
LOG_SHUTDOWN_FLUSH_FAILED = "lifespan shutdown: flushing batches failed; continuing the shutdown"
LOG_LIFESPAN_FOR_APP = "the app does not handle lifespan (%s); Koala answers it, to flush at shutdown"

#: ``scope`` key of the request's tracker (HTTP only).
SCOPE_KEY = TRACKER_KEY
#: ``scope`` key of a websocket visitor's ``ko_id``, or None.
VISITOR_ID_KEY = "koala.visitor_id"
#: ``scope["state"]`` key, i.e. ``request.state.koala`` in Starlette and FastAPI.
STATE_KEY = "koala"

_SHUTDOWN_MESSAGES = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


def request_info(scope: Scope) -> RequestInfo:
    """Read what the rules need from an ``http`` or ``websocket`` scope (for ``should_track``)."""
    cookie, gpc = _cookie_and_gpc(scope)
    host, _ = _site(scope)
    user_agent, ip = _visitor(scope)
    method = scope.get("method")
    return RequestInfo(
        method if isinstance(method, str) and method else "GET",
        _scheme(scope),
        host,
        _path(scope),
        [cookie.decode("latin-1")] if cookie is not None else [],
        user_agent,
        ip,
        gpc,
        scope,
    )


def _headers(scope: Scope) -> Iterable[tuple[bytes, bytes]]:
    """The scope's headers; none when a (non-conforming) scope has none."""
    headers: Iterable[tuple[bytes, bytes]] | None = scope.get("headers")
    return headers if headers is not None else ()


def _cookie_and_gpc(scope: Scope) -> tuple[bytes | None, bool]:
    """The Cookie header (every one, joined with ``"; "`` as HTTP/2 prescribes) and Sec-GPC.

    Names are compared as the lower-case bytes ASGI servers send (Starlette's ``Headers``
    relies on the same).
    """
    cookie = None
    gpc = False
    for name, value in _headers(scope):
        if name == b"cookie":
            cookie = value if cookie is None else cookie + b"; " + value
        elif name == b"sec-gpc":
            gpc = gpc or sec_gpc(value)
    return cookie, gpc


def _first_header(scope: Scope, wanted: bytes) -> str | None:
    headers = scope.get("headers")
    if headers is None:
        return None
    for name, value in headers:
        if name == wanted:
            return value.decode("latin-1") if value.__class__ is bytes else header_text(value)
    return None


def _scheme(scope: Scope) -> str:
    scheme = scope.get("scheme")
    return scheme if isinstance(scheme, str) and scheme else "http"


def _path(scope: Scope) -> str:
    """The path the app routes on: ``path`` without the ``root_path`` the app is mounted at
    (Starlette's ``Mount`` and ``uvicorn --root-path`` keep the full path in ``path``)."""
    path = scope.get("path")
    if not isinstance(path, str) or not path:
        path = path_text(path)  # bytes or None from an odd server: never a TypeError
    root = scope.get("root_path")
    root = root.rstrip("/") if isinstance(root, str) else ""
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def _site(scope: Scope) -> tuple[str | None, bool]:
    """The Host header (or, without one, as in HTTP/1.0, the server's name: a unix socket
    path is refused later) and whether the request came over TLS."""
    host = _first_header(scope, b"host")
    if host is None:
        server = scope.get("server")
        host = header_text(server[0]) if isinstance(server, (tuple, list)) and server else None
    return host, scope.get("scheme") in ("https", "wss")


def _visitor(scope: Scope) -> tuple[str | None, str | None]:
    client = scope.get("client")  # (host, port); a unix socket or a test client puts a name
    ip = client_ip(client[0]) if isinstance(client, (tuple, list)) and client else None
    return _first_header(scope, b"user-agent") or None, ip


SCOPE_READER = RequestReader(info=request_info, path=_path, site=_site, visitor=_visitor)


class KoalaASGIMiddleware:
    """Sets the ``ko_id`` cookie and gives every HTTP request a tracker.

    ``app.add_middleware(KoalaASGIMiddleware, client=client)`` in FastAPI and Starlette,
    ``DefineMiddleware(KoalaASGIMiddleware, client=client)`` in Litestar, or
    ``KoalaASGIMiddleware(app, client=client)`` around any ASGI app.

    :param app: the ASGI application to wrap (by position or by name).
    :param client: a shared :class:`~koala_middleware.KoalaClient`; when omitted, one is
        made from ``options``.
    :param options: the visitor options and, without ``client``, the ``KoalaClient``
        options, as for :class:`~koala_middleware.KoalaWSGIMiddleware`.
        Note that Starlette builds its middleware when the app first runs, so with
        ``add_middleware`` a wrong option is reported at startup.
    """

    def __init__(self, app: ASGIApp, client: KoalaClient | None = None, **options: Unpack[VisitorOptions]) -> None:
        # ``app`` also by name: Litestar's ``DefineMiddleware`` passes ``app=``.
        self.app = app
        self.client, settings = configure(client, **options)
        self.visits = Visits(self.client, settings, SCOPE_READER, _ASGIVisit)
        self.pixel = asgi_proxy(settings.pixel, self.client)  # None unless pixel_path is set

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pixel = self.pixel
        if pixel is not None:
            # A substring test first (lifespan has no path): every request passes here.
            path = scope.get("path")
            if isinstance(path, str) and pixel.prefix in path and pixel.claims(scope):
                await pixel(scope, receive, send)  # the first-party pixel: never the app
                return
        if scope["type"] != "http":
            await self._not_http(scope, receive, send)
            return
        # _cookie_and_gpc, inlined: every request passes here, and inside a real server the
        # call costs as much as the loop (measured under uvicorn: 0.5 us vs 0.6 us a request).
        cookie = None
        gpc = False
        headers = scope.get("headers")
        for name, value in headers if headers is not None else ():
            if name == b"cookie":
                cookie = value if cookie is None else cookie + b"; " + value
            elif name == b"sec-gpc":
                gpc = gpc or sec_gpc(value)
        tracker = self.visits.enter(scope, scope, cookie, gpc)
        if tracker is None:  # an outer Koala middleware handles this request
            await self.app(scope, receive, send)
            return
        state = scope.get("state")
        if state is None:  # not setdefault: that builds a dict on every request
            state = scope["state"] = {}
        state[STATE_KEY] = tracker
        token = bind(tracker)
        try:
            # Always wrapped: the handler may call tracker.reset(), which needs a Set-Cookie.
            tracker._respond = send
            await self.app(scope, receive, tracker.send_with_cookies)
        finally:
            # Events recorded before an exception are still sent; the exception goes on as it is.
            unbind(token)
            if (
                tracker._count and self.client.sync
            ):  # sync mode posts (not on the event loop); _count, not has_records: no call
                await _in_thread(tracker.finish)
            else:
                tracker.finish()  # an append to the sender's queue

    async def _not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await lifespan_with_flush(self.app, self._flush, scope, receive, send)
            return
        if kind == "websocket" and VISITOR_ID_KEY not in scope:
            scope[VISITOR_ID_KEY] = self._known_visitor(scope)
        await self.app(scope, receive, send)

    def _known_visitor(self, scope: Scope) -> str | None:
        """A websocket's ``ko_id``, under the same exclusion and opt-out rules as HTTP."""
        tracker = self.visits.start(scope, *_cookie_and_gpc(scope))
        if not tracker.enabled or tracker.new_visitor:
            return None  # opted out, excluded, or a new id no browser will ever keep
        return tracker.profile_id

    def _flush(self) -> None:
        flush_at_shutdown(self.client)


async def lifespan_with_flush(
    app: ASGIApp, flush: Callable[[], None], scope: Scope, receive: Receive, send: Send
) -> None:
    """Pass lifespan through to ``app``, calling ``flush()`` (in a thread) just before the app
    reports it has shut down (so what its shutdown handlers tracked is included).

    An app that ends or raises without ever calling ``receive`` does not speak lifespan
    (the server would go on without it, and without a flush at shutdown): then this
    answers the protocol itself. Any other exception propagates unchanged.
    """
    used = False

    async def receive_and_note() -> Message:
        nonlocal used
        used = True
        return await receive()

    async def send_after_flush(message: Message) -> None:
        nonlocal used
        used = True
        if message["type"] in _SHUTDOWN_MESSAGES:
            await _in_thread(flush)
        await send(message)

    try:
        await app(scope, receive_and_note, send_after_flush)
    except Exception as exc:
        if used:
            raise
        logger.debug(LOG_LIFESPAN_FOR_APP, type(exc).__name__)
    else:
        if used:
            return
        logger.debug(LOG_LIFESPAN_FOR_APP, "it returned at once")
    await _answer_lifespan(flush, receive, send)


async def _answer_lifespan(flush: Callable[[], None], receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await _in_thread(flush)
            await send({"type": "lifespan.shutdown.complete"})
            return


def flush_at_shutdown(client: KoalaClient) -> None:
    """Flush within ``client.shutdown_timeout``; a failure is logged, never raised (the
    server's shutdown must go on)."""
    timeout = client.shutdown_timeout
    try:
        if not client.flush(timeout):
            logger.warning(LOG_SHUTDOWN_FLUSH_TIMEOUT, timeout)
    except Exception:
        logger.exception(LOG_SHUTDOWN_FLUSH_FAILED)


class _ASGIVisit(RequestTracker):
    """The request's tracker, whose :meth:`send_with_cookies` is the ``send`` the app gets:
    one object per request, not a tracker and a closure (a bound method costs 0.03 us where
    the closure cost 0.07-0.12 us; with enter's shortcut, bench part 1, one run: Starlette
    returning visitor 1.26x -> 1.25x, each header unseen 1.27x -> 1.25x). The glue sets ``_respond``
    to the server's ``send``; the hand-over lets go of it."""

    __slots__ = ()

    def send_with_cookies(self, message: Message) -> Awaitable[None]:
        """``send``, adding the visitor's ``Set-Cookie`` values to the response start (if
        allowed; see ``RequestTracker.start_response``).

        Returns ``send``'s awaitable, not a coroutine of its own: every message passes
        here, and an ``async def`` wrapper costs a coroutine per message (measured: 0.35 us
        vs 0.45 us a two-message response). The app's headers are kept as they are, in order
        (several ``Set-Cookie`` included); the message is copied, never changed in place,
        and its headers read once (any iterable).
        """
        if self._stage:  # the response started: its body, passed on (no lookup per chunk)
            return self._respond(message)  # type: ignore[no-any-return]
        if message["type"] == "http.response.start":
            if self._set_cookies is None:
                # No cookie pending (a returning visitor, no reset()): the response starts as
                # it is. The tracker's fields are set here, not through start_response():
                # no lambda, no headers read, no call (bench part 1, one run: Starlette
                # returning visitor 1.31x -> 1.27x of the bare app).
                self._stage = STARTED
                return self._respond(message)  # type: ignore[no-any-return]
            headers = message.get("headers") or []
            if not isinstance(headers, list):
                headers = list(headers)  # any iterable: read once
            cookies = self.start_response(message["status"], lambda: _cache_control(headers))
            if cookies is not None:
                # Appended to a copy, not [*headers, *[...]]: no comprehension's function
                # per response (micro: 280 -> 200 ns).
                headers = headers.copy()
                for cookie in cookies:
                    headers.append((b"set-cookie", cookie.encode("latin-1")))
                message = {**message, "headers": headers}
        return self._respond(message)  # type: ignore[no-any-return]


def _cache_control(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    values = None
    for name, value in headers:  # a loop, not a comprehension: no list for the usual no
        # The length first: most names are not 13 bytes long, and skip lower() (micro: 115 ->
        # 75 ns for a two-header response).
        if len(name) == 13 and name.lower() == b"cache-control":
            values = value.decode("latin-1") if values is None else values + ", " + value.decode("latin-1")
    return values
