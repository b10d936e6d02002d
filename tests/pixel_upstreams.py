"""Stand-ins for Koala's two pixel upstreams (the API and the CDN): real HTTP servers on
loopback (the standard library's, one thread a request), recording what they were sent, and
a WebSocket echo server (the ``websockets`` package)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SDK_JS = b"window.__koala_sdk_loaded = true; /* stand-in sdk.js */\n" * 20
BIG_CHUNK = b"x" * 65536


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    raw_headers: list[tuple[str, str]] = field(default_factory=list)


class _QuietServer(ThreadingHTTPServer):
    """Joins its handler threads on close, after cutting the connections still open (the
    proxies' kept-alive ones): nothing of it outlives the test module."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.open_connections: set[socket.socket] = set()
        self.stopping = threading.Event()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.open_connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a proxy that hung up mid-answer (the deadline tests) is expected here

    def close(self) -> None:
        self.stopping.set()
        self.shutdown()
        for connection in list(self.open_connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self.server_close()  # joins the handler threads


class Upstream:
    """One stand-in server; ``seen`` lists the requests it got, in order."""

    def __init__(self, sdk_js: bytes = SDK_JS) -> None:
        self.sdk_js = sdk_js
        self.seen: list[Seen] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                upstream.seen.append(
                    Seen(
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                        [(k.lower(), v) for k, v in self.headers.items()],
                    )
                )
                upstream.answer(self, body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _any

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        path = handler.path.split("?")[0]
        send = handler.send_response
        if path.endswith("/sdk.js") or path.endswith(".chunk.js"):
            send(200)
            handler.send_header("Content-Type", "application/javascript")
            handler.send_header("Cache-Control", "public, max-age=60")
            handler.send_header("Content-Length", str(len(self.sdk_js)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(self.sdk_js)
            return
        if path == "/gzip":
            data = gzip.compress(b'{"compressed": true}' * 50)
            send(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Encoding", "gzip")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        if path in ("/stream", "/drip", "/huge"):
            send(200)
            handler.send_header("Content-Type", "text/plain")
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            count, delay, chunk = {
                "/stream": (3, 0.3, b"part\n"),
                "/drip": (100, 0.1, b"."),
                "/huge": (400, 0, BIG_CHUNK),
            }[path]
            try:
                for _ in range(count):
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    handler.wfile.flush()
                    self.server.stopping.wait(delay)
                handler.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
            return
        if path == "/slow":
            self.server.stopping.wait(5)
        if path == "/redirect":
            send(302)
            handler.send_header("Location", "/web/after-redirect")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if path == "/redirect-absolute":
            send(301)
            handler.send_header("Location", self.url + "/web/after-redirect")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        data = json.dumps({"method": handler.command, "path": handler.path, "body": body.decode("latin-1")}).encode()
        send(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if path == "/cookies":
            handler.send_header("Set-Cookie", "ko_sid=abc; Path=/; Max-Age=60")
            handler.send_header("Set-Cookie", "ko_far=1; Domain=getkoala.com; Path=/")
            handler.send_header("Set-Cookie", "ko_near=1; Domain=example.test; Path=/")
            handler.send_header("Set-Cookie", "session=stolen; Path=/")
        if path == "/hop":
            handler.send_header("Connection", "X-Custom-Hop")
            handler.send_header("X-Custom-Hop", "1")
            handler.send_header("Keep-Alive", "timeout=5")
            handler.send_header("Strict-Transport-Security", "max-age=63072000; includeSubDomains")
            handler.send_header("Clear-Site-Data", '"cookies"')
            handler.send_header("X-Kept", "yes")
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def close(self) -> None:
        self.server.close()


class EchoWebSocket:
    """A WebSocket server that sends back what it receives, and records each handshake's headers."""

    def __init__(self) -> None:
        self.handshakes: list[dict[str, str]] = []
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        from websockets.asyncio.server import serve

        async def echo(connection: Any) -> None:
            self.handshakes.append({k.lower(): v for k, v in connection.request.headers.raw_items()})
            async for message in connection:
                await connection.send(message)

        self._stop = self.loop.create_future()
        async with serve(echo, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"
            self._ready.set()
            await self._stop

    def close(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set_result, None)
        self.thread.join(5)


@contextmanager
def upstreams(sdk_js: bytes = SDK_JS) -> Iterator[tuple[Upstream, Upstream]]:
    """``(api, cdn)``; the CDN serves ``sdk_js`` as every ``sdk.js``."""
    api, cdn = Upstream(), Upstream(sdk_js)
    try:
        yield api, cdn
    finally:
        api.close()
        cdn.close()
