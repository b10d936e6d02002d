"""The pixel proxy as the WSGI middleware runs it: blocking I/O in the worker that took the
request (``httpx.Client``, thread-safe, shared), the answer streamed as the upstream sends it.
WSGI cannot hold a WebSocket: an upgrade is answered ``501``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING

from ._route import Rejected, route
from ._settings import PixelSettings
from ._stats import PixelStats, describe
from ._upstream import SyncUpstream, error_answer

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["WSGIPixelProxy", "read_body"]


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


class WSGIPixelProxy:
    """Answers every request under ``settings.prefix`` from the upstreams; never calls the app.

    :param proxy: the Koala client's egress proxy (None: the environment's).
    """

    def __init__(self, settings: PixelSettings, proxy: str | None) -> None:
        self.settings = settings
        self.prefix = settings.prefix
        self.stats = PixelStats()
        self.upstream = SyncUpstream(settings, proxy, self.stats)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            return self._proxy(environ, start_response)
        except Exception as exc:  # a bug of ours, or a server's odd environ: a 502, never the app's problem
            self.stats.failed("proxy_error", describe(exc), exc)
            return _error(start_response, 502)

    def _proxy(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        from ..wsgi import _path

        if (environ.get("HTTP_UPGRADE") or "").lower() == "websocket":
            self.stats.failed("websocket_failed", "a WSGI server cannot hold a WebSocket; answered 501")
            return _error(start_response, 501)
        headers = [
            (key[5:].replace("_", "-").lower(), value)
            for key, value in environ.items()
            if key.startswith("HTTP_") and isinstance(value, str)
        ]
        if environ.get("CONTENT_TYPE"):
            headers.append(("content-type", environ["CONTENT_TYPE"]))
        try:
            out = route(
                self.settings,
                environ.get("REQUEST_METHOD", "GET"),
                _path(environ)[len(self.settings.path) :],
                environ.get("QUERY_STRING", ""),
                headers,
                environ.get("REMOTE_ADDR") or None,
                _port(environ),
            )
            body = read_body(environ, self.settings.max_body)
        except Rejected as exc:
            self.stats.failed("too_large" if exc.status == 413 else "rejected", exc.reason)
            return _error(start_response, exc.status)
        answer = self.upstream.open(out, body, environ.get("HTTP_HOST"))
        start_response(_status_line(answer.status), answer.headers)
        return _Body(answer.body, answer.close)


class _Body:
    """The upstream body, with the ``close()`` PEP 3333 servers call: it frees the upstream
    connection even when the visitor went away mid-answer."""

    def __init__(self, chunks: Iterator[bytes], close: object) -> None:
        self._chunks = chunks
        self._close = close

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        if callable(self._close):
            self._close()


def read_body(environ: WSGIEnvironment, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (more: :class:`Rejected` 413)."""
    length_header = environ.get("CONTENT_LENGTH") or ""
    length: int | None = None
    if length_header:
        if not (length_header.strip().isascii() and length_header.strip().isdigit()):  # no sign, no "1_0"
            raise Rejected(400, "a Content-Length that is not a number")
        length = int(length_header)
        if length > limit:
            raise Rejected(413, f"Content-Length {length} > {limit}")
    stream = environ.get("wsgi.input")
    if stream is None or length == 0:
        return b""
    try:
        if length is None:
            chunked = environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
            if not chunked and not environ.get("wsgi.input_terminated"):
                return b""
            body = stream.read(limit + 1)
        else:
            body = stream.read(length)
    except (OSError, ValueError) as exc:  # the visitor went away mid-body, or sent a broken one
        raise Rejected(400, f"the body could not be read ({type(exc).__name__})") from None
    if len(body) > limit:
        raise Rejected(413, f"a chunked body over {limit}")
    return body  # type: ignore[no-any-return]


def _port(environ: WSGIEnvironment) -> int:
    """The visitor's port, or 0 when a proxy fix replaced the address (its port is the proxy's)."""
    orig = environ.get("werkzeug.proxy_fix.orig")
    if orig is not None and orig.get("REMOTE_ADDR") != environ.get("REMOTE_ADDR"):
        return 0
    with contextlib.suppress(TypeError, ValueError):
        return int(environ.get("REMOTE_PORT") or 0)
    return 0


def _error(start_response: StartResponse, status: int) -> list[bytes]:
    code, headers, body = error_answer(status)
    start_response(_status_line(code), headers)
    return [body]
