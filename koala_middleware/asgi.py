"""Koala for ASGI apps (FastAPI, Starlette, any ASGI 3 app). Pure ASGI: no BaseHTTPMiddleware.

Each HTTP request gets a :class:`~koala_middleware.Tracker` in ``scope["koala.tracker"]``,
``request.state.koala`` and ``current_tracker()``; it is handed to the client when the app
has finished (after the last body chunk went out, and after any background tasks).
Websockets may read the visitor id (``scope["koala.visitor_id"]``) but never get a cookie.
Lifespan passes through; on shutdown, pending batches are flushed within ``shutdown_timeout``.

The visitor IP is ``scope["client"]``: behind a proxy, run the server with its proxy-headers
handling (``uvicorn --proxy-headers --forwarded-allow-ips=...``); ``X-Forwarded-For`` is
client-controlled and never read here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._client import KoalaClient
from ._request import RequestInfo
from ._visit import Visits, configure

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SCOPE_KEY = "koala.tracker"


def request_info(scope: Scope) -> RequestInfo:
    host = user_agent = None
    cookies: list[str] = []
    gpc = False
    for name, value in scope["headers"]:
        if name == b"cookie":
            cookies.append(value.decode("latin-1"))
        elif name == b"host":
            host = value.decode("latin-1")
        elif name == b"user-agent":
            user_agent = value.decode("latin-1")
        elif name == b"sec-gpc":
            gpc = value == b"1"
    client = scope.get("client")
    if host is None and scope.get("server"):
        host = scope["server"][0]
    return RequestInfo(
        method=scope.get("method", "GET"),
        scheme=scope.get("scheme", "http"),
        host=host,
        path=scope.get("path", "/"),
        cookie_headers=cookies,
        user_agent=user_agent,
        ip=client[0] if client else None,
        gpc=gpc,
        raw=scope,
    )


class KoalaASGIMiddleware:
    """Sets the ``ko_id`` cookie and gives every HTTP request a tracker.

    :param app: the ASGI application to wrap.
    :param client: a shared :class:`~koala_middleware.KoalaClient`; when omitted, one is
        made from ``options``.
    :param options: ``KoalaClient`` options and middleware options, as for the WSGI one.
    """

    def __init__(self, app: ASGIApp, client: KoalaClient | None = None, **options: Any) -> None:
        self.app = app
        self.client, settings = configure(client, options)
        self.visits = Visits(self.client, settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, self._on_lifespan(send))
            return
        if kind == "websocket":
            cookies = [v.decode("latin-1") for k, v in scope["headers"] if k == b"cookie"]
            scope["koala.visitor_id"] = self.visits.visitor_id(cookies)
        if kind != "http":
            await self.app(scope, receive, send)
            return

        visit = self.visits.start(request_info(scope))
        scope[SCOPE_KEY] = visit.tracker
        scope.setdefault("state", {})["koala"] = visit.tracker

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers") or []
                cookie = visit.cookie_for(message["status"], _cache_control(headers))
                if cookie:
                    message["headers"] = [*headers, (b"set-cookie", cookie.encode("latin-1"))]
            await send(message)

        visit.bind()
        try:
            await self.app(scope, receive, send_with_cookie if visit.set_cookie else send)
        finally:
            visit.unbind()
            if self.client.sync:
                await asyncio.get_running_loop().run_in_executor(None, visit.finish)
            else:
                visit.finish()

    def _on_lifespan(self, send: Send) -> Send:
        async def send_and_flush(message: Message) -> None:
            if message["type"].startswith("lifespan.shutdown"):
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, self.client.flush, self.client.shutdown_timeout)
            await send(message)

        return send_and_flush


def _cache_control(headers: Any) -> str | None:
    values = [value.decode("latin-1") for name, value in headers if name.lower() == b"cache-control"]
    return ", ".join(values) if values else None
