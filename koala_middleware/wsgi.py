"""Koala for WSGI apps (Flask, Django, Pyramid, bare WSGI).

Wrap the app; each request gets a :class:`~koala_middleware.Tracker` in
``environ["koala.tracker"]`` (and ``current_tracker()``), and what it recorded is handed to
the client when the server closes the response (PEP 3333), i.e. after the body went out.

The visitor IP is ``REMOTE_ADDR``. Behind a proxy, fix it first with the app's own proxy
handling (e.g. werkzeug's ``ProxyFix`` *inside* this middleware's view of the environ, i.e.
``KoalaWSGIMiddleware(ProxyFix(app))`` is wrong, ``ProxyFix(KoalaWSGIMiddleware(app))`` is
right); a raw ``X-Forwarded-For`` is client-controlled and never trusted here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._client import KoalaClient
from ._request import RequestInfo
from ._visit import Visit, Visits, configure

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

ENVIRON_KEY = "koala.tracker"


def request_info(environ: WSGIEnvironment) -> RequestInfo:
    cookie = environ.get("HTTP_COOKIE")
    return RequestInfo(
        method=environ.get("REQUEST_METHOD", "GET"),
        scheme=environ.get("wsgi.url_scheme", "http"),
        host=environ.get("HTTP_HOST") or environ.get("SERVER_NAME"),
        path=environ.get("PATH_INFO", "") or "/",
        cookie_headers=[cookie] if cookie else [],
        user_agent=environ.get("HTTP_USER_AGENT") or None,
        ip=environ.get("REMOTE_ADDR") or None,
        gpc=environ.get("HTTP_SEC_GPC") == "1",
        raw=environ,
    )


class _ClosingIterable:
    """The app's response iterable, unchanged but for a ``close()`` that finishes the visit."""

    __slots__ = ("_iterable", "_visit")

    def __init__(self, iterable: Iterable[bytes], visit: Visit) -> None:
        self._iterable = iterable
        self._visit = visit

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._iterable)

    def close(self) -> None:
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        finally:
            self._visit.finish()


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

        def start_with_cookie(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
            cookie = visit.set_cookie and visit.cookie_for(_status_code(status), _cache_control(headers))
            if cookie:
                headers = [*headers, ("Set-Cookie", cookie)]
            return start_response(status, headers, exc_info)

        visit.bind()
        try:
            iterable = self.app(environ, start_with_cookie)
        except BaseException:
            visit.finish()
            raise
        return _ClosingIterable(iterable, visit)


def _status_code(status: str) -> int:
    try:
        return int(status[:3])
    except ValueError:
        return 500


def _cache_control(headers: list[tuple[str, str]]) -> str | None:
    values = [value for name, value in headers if name.lower() == "cache-control"]
    return ", ".join(values) if values else None
