"""The pixel proxy inside Django's middleware: the request read through Django's
``HttpRequest``, the upstream answer handed back as a ``StreamingHttpResponse`` (sync
iterator in a sync stack, async iterator in an async one). Django's ASGI handler does not
pass WebSockets to middleware: those need the ASGI middleware (see docs/pixel.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from django.http import HttpResponse, StreamingHttpResponse

from ._route import Outgoing, Rejected, route
from ._settings import PixelSettings
from ._stats import PixelStats
from ._upstream import AsyncUpstream, SyncUpstream, error_answer

__all__ = ["DjangoPixelProxy"]


class DjangoPixelProxy:
    def __init__(self, settings: PixelSettings, proxy: str | None) -> None:
        self.settings = settings
        self.prefix = settings.prefix
        self.stats = PixelStats()
        self.sync_upstream = SyncUpstream(settings, proxy, self.stats)
        self.async_upstream = AsyncUpstream(settings, proxy, self.stats)

    def _prepare(self, request: Any) -> tuple[Outgoing, bytes] | HttpResponse:
        meta = request.META
        if (meta.get("HTTP_UPGRADE") or "").lower() == "websocket":
            self.stats.failed("websocket_failed", "Django middleware cannot hold a WebSocket; answered 501")
            return _error(501)
        headers = [(name.lower(), value) for name, value in request.headers.items()]
        try:
            out = route(
                self.settings,
                request.method or "GET",
                (request.path_info or "/")[len(self.settings.path) :],
                meta.get("QUERY_STRING", ""),
                headers,
                meta.get("REMOTE_ADDR") or None,
                None,
            )
            length = meta.get("CONTENT_LENGTH") or "0"
            if not (str(length).isascii() and str(length).isdigit()):
                raise Rejected(400, "a Content-Length that is not a number")
            if int(length) > self.settings.max_body:
                raise Rejected(413, f"Content-Length {length} > {self.settings.max_body}")
            body = request.read(self.settings.max_body + 1) if int(length) else b""
            if len(body) > self.settings.max_body:
                raise Rejected(413, f"a body over {self.settings.max_body}")
        except Rejected as exc:
            self.stats.failed("too_large" if exc.status == 413 else "rejected", exc.reason)
            return _error(exc.status)
        return out, body

    def respond(self, request: Any) -> HttpResponse | StreamingHttpResponse:
        prepared = self._prepare(request)
        if isinstance(prepared, HttpResponse):
            return prepared
        out, body = prepared
        answer = self.sync_upstream.open(out, body, request.META.get("HTTP_HOST"))
        return _response(answer.status, answer.headers, _closing(answer.body, answer.close))

    async def respond_async(self, request: Any) -> HttpResponse | StreamingHttpResponse:
        prepared = self._prepare(request)
        if isinstance(prepared, HttpResponse):
            return prepared
        out, body = prepared
        answer = await self.async_upstream.open(out, body, request.META.get("HTTP_HOST"))
        return _response(answer.status, answer.headers, answer.body)


def _closing(chunks: Iterator[bytes], close: Any) -> Iterator[bytes]:
    try:
        yield from chunks
    finally:
        close()


def _response(
    status: int, headers: list[tuple[str, str]], body: Iterator[bytes] | AsyncIterator[bytes]
) -> StreamingHttpResponse:
    response = StreamingHttpResponse(body, status=status)
    del response["Content-Type"]  # only the upstream's
    for name, value in headers:
        if name.lower() == "set-cookie":
            response.cookies.load(value)
        elif name.lower() in response.headers:
            response.headers[name] = response.headers[name] + ", " + value
        else:
            response.headers[name] = value
    return response


def _error(status: int) -> HttpResponse:
    code, headers, body = error_answer(status)
    response = HttpResponse(body, status=code)
    for name, value in headers:
        response.headers[name] = value
    return response
