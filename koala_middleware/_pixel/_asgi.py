"""The pixel proxy as the ASGI middleware runs it: non-blocking (``httpx.AsyncClient``), the
answer streamed as the upstream sends it, and WebSockets relayed to the API upstream (the
``websockets`` package, imported on the first WebSocket: ``koala-middleware[pixel]``)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..asgi import _path
from ._route import Rejected, route
from ._settings import PixelSettings
from ._stats import PixelStats, describe
from ._upstream import AsyncUpstream, UpstreamCut, error_answer

__all__ = ["ASGIPixelProxy"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ASGIPixelProxy:
    """Answers every ``http`` and ``websocket`` scope under ``settings.prefix``; never calls the app."""

    def __init__(self, settings: PixelSettings, proxy: str | None) -> None:
        self.settings = settings
        self.prefix = settings.prefix
        self.proxy = proxy
        self.stats = PixelStats()
        self.upstream = AsyncUpstream(settings, proxy, self.stats)

    def claims(self, scope: Scope) -> bool:
        """Whether the scope's path (below any ``root_path``) is under the prefix. Runs on
        every request: the common case (no ``root_path``) is one ``startswith``."""
        if scope.get("root_path"):
            return _path(scope).startswith(self.prefix)
        return scope["path"].startswith(self.prefix)  # type: ignore[no-any-return]

    def _out_path(self, scope: Scope) -> str:
        return _path(scope)[len(self.settings.path) :]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send_noting_start)
            else:
                await self._http(scope, receive, send_noting_start)
        except Exception as exc:  # a bug of ours, or a server's odd scope: a 502, never raised
            self.stats.failed("proxy_error", describe(exc), exc)
            if not started:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1011})
                else:
                    await _send_error(send, 502)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in scope["headers"]]
        client = scope.get("client")
        try:
            out = route(
                self.settings,
                scope.get("method", "GET"),
                self._out_path(scope),
                scope.get("query_string", b"").decode("latin-1"),
                headers,
                client[0] if client else None,
                client[1] if client else None,
            )
            body = await _read_body(receive, headers, self.settings.max_body)
        except Rejected as exc:
            self.stats.failed("too_large" if exc.status == 413 else "rejected", exc.reason)
            await _send_error(send, exc.status)
            return
        host = next((value for name, value in headers if name == "host"), None)
        answer = await self.upstream.open(out, body, host)
        chunks = answer.body
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": answer.status,
                    "headers": [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in answer.headers],
                }
            )
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except UpstreamCut:
            pass  # no last message: the server closes the connection, the browser sees it cut
        except OSError:
            pass  # the visitor went away: the upstream answer is closed below
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        headers = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in scope["headers"]]
        client = scope.get("client")
        try:
            out = route(
                self.settings,
                "GET",
                self._out_path(scope),
                scope.get("query_string", b"").decode("latin-1"),
                headers,
                client[0] if client else None,
                client[1] if client else None,
                websocket=True,
            )
        except Rejected as exc:
            self.stats.failed("rejected", exc.reason)
            await send({"type": "websocket.close", "code": 1008})
            return
        await relay_websocket(self, out.url, out.headers, list(scope.get("subprotocols") or ()), receive, send)


async def relay_websocket(
    proxy: ASGIPixelProxy,
    url: str,
    headers: list[tuple[str, str]],
    subprotocols: list[str],
    receive: Receive,
    send: Send,
) -> None:
    """Open the upstream WebSocket, then accept the visitor's and pass messages both ways
    until either side closes. Upstream unreachable: the visitor's handshake is refused."""
    import anyio

    try:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed
    except ImportError:
        proxy.stats.failed(
            "websocket_failed", "the websockets package is missing: pip install 'koala-middleware[pixel]'"
        )
        await send({"type": "websocket.close", "code": 1011})
        return
    ws_url = "ws" + url[4:]  # http -> ws, https -> wss
    origin = next((value for name, value in headers if name == "origin"), None)
    user_agent = next((value for name, value in headers if name == "user-agent"), None)
    extra = [(name, value) for name, value in headers if name not in ("origin", "user-agent", "accept-encoding")]
    options: dict[str, Any] = {
        "additional_headers": extra,
        "user_agent_header": user_agent,
        "open_timeout": proxy.settings.connect_timeout,
        "proxy": proxy.proxy if proxy.proxy is not None else True,
    }
    if origin:
        options["origin"] = origin
    if subprotocols:
        options["subprotocols"] = subprotocols
    if ws_url.startswith("wss://"):
        import httpx

        options["ssl"] = httpx.create_ssl_context(trust_env=True)
    try:
        upstream = await connect(ws_url, **options)
    except Exception as exc:  # any failure to open: refuse the visitor's handshake, never raise
        proxy.stats.failed("websocket_failed", describe(exc))
        await send({"type": "websocket.close", "code": 1011})
        return
    proxy.stats.count("proxied")
    try:
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

        async def to_upstream() -> None:
            while True:
                message = await receive()
                if message["type"] == "websocket.receive":
                    data = message.get("bytes")
                    await upstream.send(data if data is not None else message.get("text") or "")
                elif message["type"] == "websocket.disconnect":
                    await upstream.close()
                    return

        async def to_visitor() -> None:
            try:
                async for data in upstream:
                    if isinstance(data, bytes):
                        await send({"type": "websocket.send", "bytes": data})
                    else:
                        await send({"type": "websocket.send", "text": data})
            except ConnectionClosed:
                pass
            code = upstream.close_code or 1000
            await send({"type": "websocket.close", "code": code if code != 1006 else 1011})

        async with anyio.create_task_group() as group:

            async def run(part: Callable[[], Awaitable[None]]) -> None:
                with contextlib.suppress(ConnectionClosed, OSError):
                    await part()
                group.cancel_scope.cancel()

            group.start_soon(run, to_upstream)
            group.start_soon(run, to_visitor)
    except Exception as exc:  # the relay must never raise into the server
        proxy.stats.failed("websocket_failed", describe(exc))
    finally:
        with anyio.CancelScope(shield=True):
            await upstream.close()


async def _read_body(receive: Receive, headers: list[tuple[str, str]], limit: int) -> bytes:
    length = next((value for name, value in headers if name == "content-length"), None)
    if length is not None:
        if not (length.strip().isascii() and length.strip().isdigit()):
            raise Rejected(400, "a Content-Length that is not a number")
        if int(length) > limit:
            raise Rejected(413, f"Content-Length {int(length)} > {limit}")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise Rejected(400, "the visitor went away before the body was read")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"a body over {limit}")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _send_error(send: Send, status: int) -> None:
    code, headers, body = error_answer(status)
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    try:
        await send({"type": "http.response.start", "status": code, "headers": raw})
        await send({"type": "http.response.body", "body": body})
    except OSError:
        pass
