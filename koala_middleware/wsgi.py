"""Koala for WSGI apps (Flask, Django, Pyramid, bare WSGI).

Wrap the app; each request gets a :class:`~koala_middleware.Tracker` in
``environ["koala.tracker"]``, which is also ``current_tracker()`` whenever the app's code
runs (the call, each chunk of the body, its ``close()``). What it recorded is handed to the
client when the server closes the response (PEP 3333), i.e. after the body went out. The
response iterable is passed on as it is iterated, so streaming responses still stream.

The visitor IP is ``REMOTE_ADDR``, and the cookie's domain and ``Secure`` flag follow
``HTTP_HOST`` and ``wsgi.url_scheme``. Behind a proxy, have the app's own proxy handling
fix those *before* this middleware reads them: ``ProxyFix(KoalaWSGIMiddleware(app))`` is
right, ``KoalaWSGIMiddleware(ProxyFix(app))`` sees the proxy's address. A raw
``X-Forwarded-For`` is client-controlled and never read here.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._client import KoalaClient
from ._pixel import wsgi_proxy
from ._request import RequestInfo, RequestReader, client_ip, header_text, path_text, sec_gpc
from ._tracker import STARTED, RequestTracker, bind
from ._visit import TRACKER_KEY, VisitorOptions, Visits, configure

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from typing_extensions import Unpack

ENVIRON_KEY = TRACKER_KEY

__all__ = ["ENVIRON_KEY", "KoalaWSGIMiddleware", "request_info"]


def request_info(environ: WSGIEnvironment) -> RequestInfo:
    """Read what the rules need from ``environ`` (for ``should_track``)."""
    cookie = header_text(environ.get("HTTP_COOKIE"))
    host, https = _site(environ)
    user_agent, ip = _visitor(environ)
    method = environ.get("REQUEST_METHOD")
    return RequestInfo(
        method if isinstance(method, str) and method else "GET",
        "https" if https else "http",
        host,
        _path(environ),
        [cookie] if cookie else [],
        user_agent,
        ip,
        _gpc(environ),
        environ,
    )


def _gpc(environ: WSGIEnvironment) -> bool:
    value = environ.get("HTTP_SEC_GPC")
    return value is not None and (value == "1" or sec_gpc(value))


def _path(environ: WSGIEnvironment) -> str:
    path = environ.get("PATH_INFO")
    if not isinstance(path, str):
        return path_text(path)  # bytes or None from an odd server: never a TypeError
    if not path:
        return "/"
    if not path.isascii():
        # PEP 3333 hands the raw path bytes over as latin-1; ASGI gives decoded text. A
        # character above U+00FF means a server (or a test client) already decoded it.
        with contextlib.suppress(UnicodeEncodeError):
            path = path.encode("latin-1").decode("utf-8", "replace")
    return path


def _site(environ: WSGIEnvironment) -> tuple[str | None, bool]:
    host = header_text(environ.get("HTTP_HOST")) or header_text(environ.get("SERVER_NAME"))
    return host, environ.get("wsgi.url_scheme") == "https"


def _visitor(environ: WSGIEnvironment) -> tuple[str | None, str | None]:
    user_agent = environ.get("HTTP_USER_AGENT")
    if user_agent.__class__ is not str:  # a call less on the batch path, for the usual str
        user_agent = header_text(user_agent)
    return user_agent or None, client_ip(environ.get("REMOTE_ADDR"))


ENVIRON_READER = RequestReader(info=request_info, path=_path, site=_site, visitor=_visitor)


class KoalaWSGIMiddleware:
    """Sets the ``ko_id`` cookie and gives every request a tracker.

    :param app: the WSGI application to wrap.
    :param client: a shared :class:`~koala_middleware.KoalaClient`; when omitted, one is
        made from the ``KoalaClient`` options among ``options`` (``public_key``, ...).
    :param options: the visitor options (``cookie_domain``, ``allowed_hosts``,
        ``exclude_paths``, ``should_track``, ``respect_gpc``, ...: see
        :func:`koala_middleware._visit.configure`, and the README), and without ``client``
        the ``KoalaClient`` options.
    """

    def __init__(
        self, app: WSGIApplication, client: KoalaClient | None = None, **options: Unpack[VisitorOptions]
    ) -> None:
        self.app = app
        self.client, settings = configure(client, **options)
        self.visits = Visits(self.client, settings, ENVIRON_READER, _WSGIVisit)
        self.pixel = wsgi_proxy(settings.pixel, self.client)  # None unless pixel_path is set

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        pixel = self.pixel
        if pixel is not None:
            path = environ.get("PATH_INFO")
            if isinstance(path, str) and path.startswith(pixel.prefix):
                return pixel(environ, start_response)  # the first-party pixel: never the app
        gpc = environ.get("HTTP_SEC_GPC")
        tracker = self.visits.enter(
            environ, environ, environ.get("HTTP_COOKIE"), gpc is not None and (gpc == "1" or sec_gpc(gpc))
        )
        if tracker is None:  # an outer Koala middleware handles this request
            return self.app(environ, start_response)
        # Always wrapped: the handler may call tracker.reset(), which needs a Set-Cookie.
        tracker._respond = start_response
        # The app runs in its own copy of the server's context with the tracker bound: the
        # call, each chunk and close() (see _Response), and nothing leaks into the server's.
        context = contextvars.copy_context()
        context.run(bind, tracker)
        try:
            iterable = context.run(self.app, environ, tracker.start_with_cookies)
        except BaseException:
            tracker.finish()  # what the handler recorded before raising is still sent
            raise
        if hasattr(iterable, "__len__"):
            return _SizedResponse(iterable, context, tracker)
        return _Response(iterable, context, tracker)


class _Response:
    """The app's response iterable, unchanged but for a ``close()`` that finishes the visit.

    Chunks go out as the app makes them, each made inside the request's context (so
    ``current_tracker()`` works in streaming generators), by C code alone: ``map`` calls
    ``context.run(next_chunk)`` per chunk, without a Python frame of ours. ``close()`` closes
    the app's iterable first, as PEP 3333 requires of middleware (in the same context: its
    cleanup may still record), then hands the tracker over, even if that ``close()`` raised.
    """

    __slots__ = ("_context", "_iterable", "_tracker")

    def __init__(self, iterable: Iterable[bytes], context: contextvars.Context, tracker: RequestTracker) -> None:
        self._iterable = iterable
        self._context = context
        self._tracker: RequestTracker | None = tracker  # None once closed

    def __iter__(self) -> Iterator[bytes]:
        # iter() runs no app code for lists, generators or werkzeug's iterables (a generator's
        # body starts at its first next()), so it is called directly.
        return map(self._context.run, itertools.repeat(iter(self._iterable).__next__))

    def close(self) -> None:
        tracker, self._tracker = self._tracker, None
        if tracker is None:  # some servers close twice
            return
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                self._context.run(close)
        finally:
            tracker.finish()


class _SizedResponse(_Response):
    """Keeps ``len()``: PEP 3333 servers may use it to send a Content-Length."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._iterable)  # type: ignore[arg-type]


class _WSGIVisit(RequestTracker):
    """The request's tracker, whose :meth:`start_with_cookies` is the ``start_response`` the
    app gets: one object per request, not a tracker and a closure (see asgi._ASGIVisit). The
    glue sets ``_respond`` to the server's ``start_response``; the hand-over lets go of it."""

    __slots__ = ()

    def start_with_cookies(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        """``start_response``, adding the visitor's ``Set-Cookie`` values the response may
        carry (a new visitor's, a missing copy, a ``reset()``), and telling the tracker it
        started. Called again with ``exc_info`` when an error replaces the response: the new
        headers need the cookies too, and the server decides whether to re-raise."""
        if self._set_cookies is None:  # no cookie pending: see asgi._ASGIVisit
            self._stage = STARTED
            return self._respond(status, headers, exc_info)
        cookies = self.start_response(_status_code(status), lambda: _cache_control(headers))
        if cookies is not None:
            headers = [*headers, *[("Set-Cookie", cookie) for cookie in cookies]]
        return self._respond(status, headers, exc_info)


def _status_code(status: str) -> int:
    try:
        return int(status[:3])
    except ValueError:
        return 500


def _cache_control(headers: list[tuple[str, str]]) -> str | None:
    values = [value for name, value in headers if name.lower() == "cache-control"]
    return ", ".join(values) if values else None
