"""The default delivery engine, pure Python: h11 frames HTTP/1.1, ``ssl`` does TLS.

One exchange logic (:class:`Exchange`: write a request, read an answer up to the cap,
``CONNECT`` through a proxy) is driven two ways:

- :class:`AsyncEngine`, the background sender's: asyncio Protocols (callbacks, no streams:
  measured in bench part 4, streams cost about a third more CPU per request), a pool of
  kept-alive connections no larger than ``max_in_flight``, and one timer per attempt for
  the whole-attempt deadline;
- :class:`SocketEngine`, for ``sync=True`` and ``check``: a blocking socket, one kept-alive
  connection, each read bounded by what is left of the deadline. No event loop, nothing
  native: it works in serverless runtimes and in threads that run a loop of their own.

h11 (a dependency of httpx, maintained by the python-hyper project) parses everything
Koala or a proxy sends back; the code here writes the requests (parts checked before they
get here, see :meth:`Exchange.start`) and moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time

import h11

from ._engine import BODY_CAP, KEEPALIVE, EngineError, Route, encode_headers, tls_context
from ._policy import Answer
from ._request import Request
from ._settings import DeliverySettings

_READ_SIZE = 65536


_END = h11.EndOfMessage()

#: One h11 ``Request`` event per method, made once (see :meth:`Exchange.start`).
_STAND_INS: dict[bytes, h11.Request] = {}


def _stand_in(method: bytes) -> h11.Request:
    event = _STAND_INS.get(method)
    if event is None:
        headers = [(b"Host", b"koala"), (b"Content-Length", b"0")]
        event = _STAND_INS[method] = h11.Request(method=method, target=b"/", headers=headers)
    return event


def serialize(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """An HTTP/1.1 request as bytes. Its parts come checked (``_request.build`` escapes
    control characters in header values, paths carry no space); a line break or a space
    where none belongs is refused all the same, so no request can be split or smuggled."""
    lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    lines.extend([b"%s: %s\r\n" % pair for pair in headers])
    head = b"".join(lines)
    if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines) or b" " in target:
        raise EngineError("a request line or header holds a line break or the target a space; not sent")
    return head + b"\r\n" + body


class Exchange:
    """One request and its answer on an h11 connection, sans I/O: ``feed`` it what arrives."""

    __slots__ = ("body", "conn", "over_cap", "received", "retry_after", "status", "tunnel")

    def __init__(self, conn: h11.Connection, tunnel: bool = False) -> None:
        self.conn = conn
        self.tunnel = tunnel  # a CONNECT: done at its answer's head
        self.status = 0
        self.retry_after: str | None = None
        self.body: list[bytes] = []
        self.received = 0
        self.over_cap = False

    def start(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
        """The bytes to write for the request.

        Measured (a micro-profile of one exchange, no I/O, CPython 3.11): h11
        writing the request (building and validating a ``Request`` event, three ``send``
        calls) was 20 of the 55 us an exchange cost. So the request is written here
        (:func:`serialize`: its parts were checked by ``_request.build`` and ``Route``),
        and h11 is only told that a request of this method went out, with a stand-in event
        made once: what h11 does with a request for the answer that follows (its framing,
        ``HEAD``; keep-alive, ``Connection: close``; the state machine) is the same for
        the stand-in. h11 still parses and checks every byte of the answer. A ``CONNECT``
        (once per connection, through a proxy) goes through h11 in full.
        """
        conn = self.conn
        if method == b"CONNECT":
            return conn.send(h11.Request(method=method, target=target, headers=headers)) + conn.send(_END)
        data = serialize(method, target, headers, body)
        conn.send(_stand_in(method))
        conn.send(_END)
        return data

    def feed(self, data: bytes) -> bool:
        """Take what arrived (``b""``: the peer closed); True once the answer is complete
        (or past the cap: then the connection must be dropped)."""
        conn = self.conn
        conn.receive_data(data)
        while True:
            event = conn.next_event()
            kind = type(event)
            if event is h11.NEED_DATA:
                return False
            if kind is h11.Response:
                self.status = event.status_code  # type: ignore[union-attr]
                for name, value in event.headers:  # type: ignore[union-attr]
                    if name == b"retry-after":
                        self.retry_after = value.decode("latin-1").strip()
                if self.tunnel:
                    return True
            elif kind is h11.Data:
                chunk = event.data  # type: ignore[union-attr]
                kept = BODY_CAP - self.received
                self.received += len(chunk)
                if kept > 0:
                    self.body.append(bytes(chunk[:kept]))
                if self.received > BODY_CAP:
                    self.over_cap = True
                    return True
            elif kind is h11.EndOfMessage or event is h11.PAUSED:
                return True
            elif kind is h11.ConnectionClosed:
                raise EngineError("the connection closed before the answer ended")
            # InformationalResponse (100 Continue and such): wait for the real answer

    def answer(self) -> Answer:
        text = b"".join(self.body)[:BODY_CAP].decode("utf-8", "replace") if self.body else ""
        return Answer(self.status, self.retry_after if self.status >= 300 else None, text)

    def reusable(self) -> bool:
        """Whether the connection can carry the next request (and makes it ready to)."""
        conn = self.conn
        if self.over_cap or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        return True


def _tunnel_refused(status: int) -> EngineError:
    return EngineError(f"the proxy answered {status} to CONNECT")


# -- the background sender: asyncio Protocols ---------------------------------------------


class _Connection(asyncio.Protocol):
    """One kept-alive connection; at most one exchange on it at a time."""

    __slots__ = ("closed", "conn", "exchange", "idle_since", "timer", "transport", "waiter")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.conn = h11.Connection(h11.CLIENT)
        self.exchange: Exchange | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # nothing asked: a kept-alive connection the peer gave up on
            self.abort()
            return
        try:
            finished = exchange.feed(data)
        except Exception as error:  # h11.RemoteProtocolError, EngineError: this connection is done
            self.abort()
            self._settle(error)
            return
        if finished:
            self._settle(None)

    def eof_received(self) -> bool | None:
        if self.exchange is not None:
            self.data_received(b"")
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._settle(exc or EngineError("the connection closed before the answer ended"))

    def _settle(self, error: BaseException | None) -> None:
        self.exchange = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def time_out(self) -> None:
        self.timer = None
        self.abort()
        self._settle(TimeoutError("no whole answer within the timeout"))

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def run(self, exchange: Exchange, data: bytes, deadline: float) -> None:
        """Write ``data`` and wait until ``exchange`` is answered, by ``deadline`` (loop time)."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.exchange = exchange
        waiter = self.waiter = loop.create_future()
        self.timer = loop.call_at(deadline, self.time_out)
        self.transport.write(data)
        try:
            await waiter
        except asyncio.CancelledError:  # shutdown: the connection is in an unknown state
            self.abort()
            self._settle(None)
            raise


class AsyncEngine:
    """The background sender's engine: h11 on asyncio Protocols, kept-alive pool."""

    name = "python (h11 on asyncio)"

    def __init__(self, route: Route, settings: DeliverySettings) -> None:
        self._loop = asyncio.get_running_loop()
        self._route = route
        self._timeout = settings.timeout
        self._pool_size = max(1, settings.max_in_flight)
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._tls: ssl.SSLContext | None = None
        self._proxy_tls: ssl.SSLContext | None = None

    async def __call__(self, request: Request) -> Answer:
        route = self._route
        return await self.send(b"POST", route.target(request.url), encode_headers(request), request.body, self._timeout)

    async def send(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes, timeout: float
    ) -> Answer:
        loop = self._loop
        deadline = loop.time() + timeout
        headers = self._route.request_headers(headers, len(body) if body or method == b"POST" else None)
        connection = self._take_idle(loop.time())
        while True:
            reused = connection is not None
            if connection is None:
                connection = await self._connect(deadline)
            exchange = Exchange(connection.conn)
            current = connection
            self._busy.add(current)
            try:
                await current.run(exchange, exchange.start(method, target, headers, body), deadline)
            except (OSError, EngineError, h11.ProtocolError):
                # A kept-alive connection the server closed as we wrote: once more on a new one.
                if reused and not exchange.status and loop.time() < deadline:
                    connection = None
                    continue
                raise
            finally:
                self._busy.discard(current)
            break
        if exchange.reusable() and not connection.closed and len(self._idle) < self._pool_size:
            connection.idle_since = loop.time()
            self._idle.append(connection)
        else:
            connection.abort()  # past the cap, or the server said close: dropped, never drained
        return exchange.answer()

    def _take_idle(self, now: float) -> _Connection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < KEEPALIVE:
                return connection
            connection.abort()
        return None

    async def _connect(self, deadline: float) -> _Connection:
        remaining = deadline - self._loop.time()
        if remaining <= 0:
            raise TimeoutError("no whole answer within the timeout")
        try:
            return await asyncio.wait_for(self._open(deadline), remaining)
        except asyncio.TimeoutError:  # a distinct class before Python 3.11
            raise TimeoutError("could not connect within the timeout") from None

    async def _open(self, deadline: float) -> _Connection:
        route, loop = self._route, self._loop
        first_tls = None
        if route.proxy is not None and route.proxy_tls:
            first_tls = self._proxy_tls = self._proxy_tls or tls_context()
        elif route.proxy is None and route.tls:
            first_tls = self._tls = self._tls or tls_context()
        transport, connection = await loop.create_connection(
            _Connection,
            route.connect_host,
            route.connect_port,
            ssl=first_tls,
            server_hostname=(route.connect_host if first_tls is not None else None),
        )
        try:
            if route.tunnel:
                exchange = Exchange(connection.conn, tunnel=True)
                data = exchange.start(b"CONNECT", route.connect_target(), route.connect_headers(), b"")
                await connection.run(exchange, data, deadline)
                if not 200 <= exchange.status < 300:
                    raise _tunnel_refused(exchange.status)
                # TLS to Koala inside the tunnel (TLS inside TLS through an https:// proxy
                # needs Python 3.11's asyncio).
                self._tls = self._tls or tls_context()
                connection.transport = await loop.start_tls(
                    transport, connection, self._tls, server_hostname=route.host
                )
                connection.conn = h11.Connection(h11.CLIENT)
        except BaseException:
            transport.abort()
            raise
        return connection

    async def close(self) -> None:
        for connection in [*self._idle, *self._busy]:
            connection.abort()
        self._idle.clear()
        self._busy.clear()


# -- sync=True and check: a blocking socket ----------------------------------------------


class SocketEngine:
    """The same exchange on a blocking socket; one kept-alive connection, not thread-safe
    (its owner serializes calls)."""

    name = "python (h11 on a blocking socket)"

    def __init__(self, route: Route) -> None:
        self._route = route
        self._sock: socket.socket | None = None
        self._conn: h11.Connection | None = None
        self._idle_since = 0.0
        self._tls: ssl.SSLContext | None = None

    def send(self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes, deadline: float) -> Answer:
        route = self._route
        target = route.target(url)
        headers = route.request_headers(headers, len(body) if body or method == "POST" else None)
        reuse = self._sock is not None and time.monotonic() - self._idle_since < KEEPALIVE
        if not reuse:
            self.close()
        while True:
            if self._sock is None:
                self._sock, self._conn = self._open(deadline), h11.Connection(h11.CLIENT)
            assert self._conn is not None
            exchange = Exchange(self._conn)
            try:
                self._run(self._sock, exchange, exchange.start(method.encode(), target, headers, body), deadline)
            except (OSError, EngineError, h11.ProtocolError):
                self.close()
                if reuse and not exchange.status and time.monotonic() < deadline:
                    reuse = False  # a kept-alive connection the server had closed: once more
                    continue
                raise
            except BaseException:
                self.close()
                raise
            break
        if exchange.reusable():
            self._idle_since = time.monotonic()
        else:
            self.close()  # past the cap, or the server said close: dropped, never drained
        return exchange.answer()

    def _run(self, sock: socket.socket, exchange: Exchange, data: bytes, deadline: float) -> None:
        _settimeout(sock, deadline)
        sock.sendall(data)
        while True:
            _settimeout(sock, deadline)
            if exchange.feed(sock.recv(_READ_SIZE)):
                return

    def _open(self, deadline: float) -> socket.socket:
        route = self._route
        remaining = _remaining(deadline)
        sock = socket.create_connection((route.connect_host, route.connect_port), timeout=remaining)
        try:
            if route.proxy is not None and route.proxy_tls:
                if route.tunnel:
                    raise EngineError(
                        "an https:// proxy in front of an https:// api_url needs the background sender "
                        "(TLS inside TLS); use an http:// proxy URL (the tunnel to Koala is TLS either way)"
                    )
                _settimeout(sock, deadline)
                sock = tls_context().wrap_socket(sock, server_hostname=route.connect_host)
            if route.tunnel:
                exchange = Exchange(h11.Connection(h11.CLIENT), tunnel=True)
                data = exchange.start(b"CONNECT", route.connect_target(), route.connect_headers(), b"")
                self._run(sock, exchange, data, deadline)
                if not 200 <= exchange.status < 300:
                    raise _tunnel_refused(exchange.status)
            if route.tls:
                self._tls = self._tls or tls_context()
                _settimeout(sock, deadline)
                sock = self._tls.wrap_socket(sock, server_hostname=route.host)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        sock, self._sock, self._conn = self._sock, None, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def forget(self) -> None:
        """In a forked child: drop the parent's connection without closing it (a TLS
        close would write to the parent's session)."""
        self._sock = self._conn = None


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("no whole answer within the timeout")
    return remaining


def _settimeout(sock: socket.socket, deadline: float) -> None:
    sock.settimeout(_remaining(deadline))
