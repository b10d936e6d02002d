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

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._client import KoalaClient
from ._request import RequestInfo
from ._tracker import bind, unbind
from ._visit import Visit, Visits, configure

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

ENVIRON_KEY = "koala.tracker"

__all__ = ["ENVIRON_KEY", "KoalaWSGIMiddleware", "request_info"]


def request_info(environ: WSGIEnvironment) -> RequestInfo:
    cookie = environ.get("HTTP_COOKIE")
    path = environ.get("PATH_INFO") or "/"
    if not path.isascii():
        # PEP 3333 hands the raw path bytes over as latin-1; ASGI gives decoded text.
        path = path.encode("latin-1").decode("utf-8", "replace")
    return RequestInfo(
        environ.get("REQUEST_METHOD", "GET"),
        environ.get("wsgi.url_scheme", "http"),
        environ.get("HTTP_HOST") or environ.get("SERVER_NAME"),
        path,
        [cookie] if cookie else [],
        environ.get("HTTP_USER_AGENT") or None,
        environ.get("REMOTE_ADDR") or None,
        environ.get("HTTP_SEC_GPC") == "1",
        environ,
    )


class _ClosingIterable:
    """The app's response iterable, unchanged but for a ``close()`` that finishes the visit.

    Iterating is delegated (so chunks go out as the app yields them), with the tracker
    ``current_tracker()`` while the app produces each chunk, and only then: the server's
    thread is left clean between chunks, and even if it never closes. ``close()`` closes
    the app's iterable first, as PEP 3333 requires of middleware, then hands the tracker
    over, even if the app's ``close()`` raised. One object is both the iterable and its
    iterator, so a request costs one wrapper.
    """

    __slots__ = ("_iterable", "_iterator", "_tracker", "_visit")

    def __init__(self, iterable: Iterable[bytes], visit: Visit) -> None:
        self._iterable = iterable
        self._iterator: Iterator[bytes] | None = None
        self._tracker = visit.tracker
        self._visit: Visit | None = visit

    def __iter__(self) -> Iterator[bytes]:
        self._iterator = iter(self._iterable)
        return self

    def __next__(self) -> bytes:
        token = bind(self._tracker)
        try:
            return next(self._iterator)  # type: ignore[arg-type]
        finally:
            unbind(token)

    def close(self) -> None:
        visit, self._visit = self._visit, None
        if visit is None:  # some servers close twice
            return
        close = getattr(self._iterable, "close", None)
        if close is None:
            visit.finish()
            return
        visit.bind()  # cleanup code in the app (a generator's finally) may still record
        try:
            close()
        finally:
            visit.finish()


class _SizedClosingIterable(_ClosingIterable):
    """Keeps ``len()``: PEP 3333 servers may use it to send a Content-Length."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._iterable)  # type: ignore[arg-type]


class KoalaWSGIMiddleware:
    """Sets the ``ko_id`` cookie and gives every request a tracker.

    :param app: the WSGI application to wrap.
    :param client: a shared :class:`~koala_middleware.KoalaClient`; when omitted, one is
        made from ``options``.
    :param options: ``KoalaClient`` options (``public_key``, ``api_url``, ...) and
        middleware options (``cookie_domain``, ``allowed_hosts``, ``exclude_paths``,
        ``should_track``, ``respect_gpc``, ...); see the README.
    """

    def __init__(self, app: WSGIApplication, client: KoalaClient | None = None, **options: Any) -> None:
        self.app = app
        self.client, settings = configure(client, options)
        self.visits = Visits(self.client, settings)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        visit = self.visits.start(request_info(environ))
        environ[ENVIRON_KEY] = visit.tracker
        if visit.set_cookie is not None:
            start_response = _StartWithCookie(start_response, visit)
        visit.bind()
        try:
            iterable = self.app(environ, start_response)
        except BaseException:
            visit.finish()  # what the handler recorded before raising is still sent
            raise
        visit.unbind()  # bound again while the app makes each chunk (see _ClosingIterable)
        if hasattr(iterable, "__len__"):
            return _SizedClosingIterable(iterable, visit)
        return _ClosingIterable(iterable, visit)


class _StartWithCookie:
    """``start_response`` for a new visitor: adds the ``Set-Cookie`` the response may carry.

    Called again with ``exc_info`` when an error replaces the response: the new headers
    need the cookie too, and the server decides whether to re-raise.
    """

    __slots__ = ("_start_response", "_visit")

    def __init__(self, start_response: StartResponse, visit: Visit) -> None:
        self._start_response = start_response
        self._visit = visit

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        cookie = self._visit.cookie_for(_status_code(status), _cache_control(headers))
        if cookie:
            headers = [*headers, ("Set-Cookie", cookie)]
        return self._start_response(status, headers, exc_info)


def _status_code(status: str) -> int:
    try:
        return int(status[:3])
    except ValueError:
        return 500


def _cache_control(headers: list[tuple[str, str]]) -> str | None:
    values = [value for name, value in headers if name.lower() == "cache-control"]
    return ", ".join(values) if values else None
