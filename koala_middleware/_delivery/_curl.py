"""The optional delivery engine: libcurl (pycurl) on the background sender's asyncio loop.

Installed with ``pip install 'koala-middleware[curl]'`` and used by the background sender
whenever pycurl imports (``KOALA_ENGINE=python`` turns it off). It keeps the engine's rules
(``_engine``): the same route (proxy resolved by ``proxy_for``, curl's own reading of the
environment turned off), trust store, whole-attempt deadline (``TIMEOUT_MS``), answer cap
(the write callback refuses more, curl drops the connection) and headers.

libcurl's multi socket API: curl does all of HTTP, the loop only watches the sockets curl
asks it to. The measured reasons it stays optional, and not the default, are in
``docs/delivery-engine.md``: pycurl has no wheels for musllinux, manylinux2014 or
free-threaded CPython, and its wheel is most of an install.
"""

from __future__ import annotations

import asyncio

import pycurl

from ._engine import BODY_CAP, KEEPALIVE, proxy_for, trust_store
from ._policy import Answer
from ._request import Request
from ._settings import DeliverySettings


class CurlEngine:
    """libcurl (pycurl) driven by the sender's asyncio loop through curl's multi socket API.

    libcurl does all of HTTP (connections kept alive in the multi's cache, CONNECT tunnels,
    TLS); the loop only watches the sockets curl asks it to.
    """

    name = "curl (pycurl on asyncio)"

    def __init__(self, settings: DeliverySettings) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_ms = max(1, int(settings.timeout * 1000))
        # "" disables curl's own reading of the environment: proxy_for resolved it (as curl does).
        self._proxy = proxy_for(settings.base_url, settings.proxy) or ""
        self._trust = trust_store()
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, max(1, settings.max_in_flight))
        self._multi.setopt(pycurl.M_MAXCONNECTS, max(1, settings.max_in_flight))
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._watched: dict[int, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._waiting: dict[pycurl.Curl, asyncio.Future[int]] = {}
        self._idle: list[pycurl.Curl] = []

    def _handle(self) -> pycurl.Curl:
        if self._idle:
            return self._idle.pop()
        curl = pycurl.Curl()
        # One _Transfer per handle, its callbacks set once: fewer objects and options per
        # request (with header lines kept by list.append, about 5% less CPU per batch).
        transfer = curl.transfer = _Transfer()  # type: ignore[attr-defined]
        curl.setopt(pycurl.WRITEFUNCTION, transfer.write)
        curl.setopt(pycurl.HEADERFUNCTION, transfer.headers.append)
        curl.setopt(pycurl.NOSIGNAL, 1)
        # HTTP/1.1 as before (curl would offer HTTP/2 over TLS): one request per connection
        # at a time, as max_in_flight counts them.
        curl.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        curl.setopt(pycurl.TIMEOUT_MS, self._timeout_ms)  # the whole attempt
        curl.setopt(pycurl.MAXAGE_CONN, int(KEEPALIVE))
        curl.setopt(pycurl.PROXY, self._proxy)
        curl.setopt(pycurl.NOPROXY, "")
        cafile, capath = self._trust
        for option, proxy_option, value in (
            (pycurl.CAINFO, pycurl.PROXY_CAINFO, cafile),
            (pycurl.CAPATH, pycurl.PROXY_CAPATH, capath),
        ):
            if value:
                curl.setopt(option, value)
                curl.setopt(proxy_option, value)
        return curl

    async def __call__(self, request: Request) -> Answer:
        curl = self._handle()
        transfer: _Transfer = curl.transfer  # type: ignore[attr-defined]
        transfer.reset()
        curl.setopt(pycurl.URL, request.url)
        curl.setopt(pycurl.POSTFIELDS, request.body)
        headers = [f"{name}: {value}".encode() for name, value in request.headers.items()]
        curl.setopt(pycurl.HTTPHEADER, headers + _NO_HEADERS)
        done = self._waiting[curl] = self._loop.create_future()
        self._multi.add_handle(curl)
        try:
            error = await done
        except BaseException:  # cancelled (shutdown): the transfer may still be running
            if self._waiting.pop(curl, None) is not None:
                self._multi.remove_handle(curl)
            curl.close()
            raise
        status = curl.getinfo(pycurl.RESPONSE_CODE)
        self._idle.append(curl)
        if error and not (error == pycurl.E_WRITE_ERROR and transfer.received > BODY_CAP and status):
            raise CurlError(error, curl.errstr() or "")
        text = b"".join(transfer.body)[:BODY_CAP].decode("utf-8", "replace")
        return Answer(status, transfer.retry_after() if status >= 300 else None, text)

    # -- curl's multi socket API on the asyncio loop ------------------------------------

    def _act(self, fd: int, events: int) -> None:
        self._multi.socket_action(fd, events)
        while True:
            queued, succeeded, failed = self._multi.info_read()
            for curl in succeeded:
                self._done(curl, 0)
            for curl, error, _message in failed:
                self._done(curl, error)
            if not queued:
                break

    def _done(self, curl: pycurl.Curl, error: int) -> None:
        self._multi.remove_handle(curl)
        future = self._waiting.pop(curl, None)
        if future is not None and not future.done():
            future.set_result(error)

    def _on_socket(self, what: int, fd: int, multi: object, data: object) -> None:
        # Only changes reach the loop: curl reports the same interest again and again, and
        # re-registering each time cost about a fifth more CPU per request (measured alone).
        was = self._watched.get(fd, 0)
        want = 0 if what == pycurl.POLL_REMOVE else what
        if was == want:
            return
        loop = self._loop
        if was & pycurl.POLL_IN and not want & pycurl.POLL_IN:
            loop.remove_reader(fd)
        if was & pycurl.POLL_OUT and not want & pycurl.POLL_OUT:
            loop.remove_writer(fd)
        if want & pycurl.POLL_IN and not was & pycurl.POLL_IN:
            loop.add_reader(fd, self._act, fd, pycurl.CSELECT_IN)
        if want & pycurl.POLL_OUT and not was & pycurl.POLL_OUT:
            loop.add_writer(fd, self._act, fd, pycurl.CSELECT_OUT)
        if want:
            self._watched[fd] = want
        else:
            self._watched.pop(fd, None)

    def _on_timer(self, milliseconds: int) -> None:
        # curl moves its timer several times per request. A timer that fires early (or is
        # no longer wanted) only makes curl look at its clocks, so it is replaced only when
        # curl needs it sooner: fewer timer handles, measurably less CPU (bench part 4).
        if milliseconds < 0:
            return
        when = self._loop.time() + milliseconds / 1000
        timer = self._timer
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timer = self._loop.call_at(when, self._on_due)

    def _on_due(self) -> None:
        self._timer = None
        self._act(pycurl.SOCKET_TIMEOUT, 0)

    async def close(self) -> None:
        for curl, future in list(self._waiting.items()):
            self._multi.remove_handle(curl)
            future.cancel()
        self._waiting.clear()
        if self._timer is not None:
            self._timer.cancel()
        for fd in list(self._watched):
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        self._watched.clear()
        for curl in self._idle:
            curl.close()
        self._idle.clear()
        self._multi.close()


class _Transfer:
    """What one handle's current transfer received: the body up to the cap, the header lines."""

    __slots__ = ("body", "headers", "received")

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.headers: list[bytes] = []
        self.received = 0

    def reset(self) -> None:
        self.body.clear()
        self.headers.clear()
        self.received = 0

    def write(self, data: bytes) -> int | None:
        kept = BODY_CAP - self.received
        self.received += len(data)
        self.body.append(data[:kept])
        if self.received > BODY_CAP:
            return 0  # more than the cap: curl drops the connection, never drains it
        return None

    def retry_after(self) -> str | None:
        """The last answer's ``Retry-After`` (the lines after a proxy's CONNECT reply)."""
        value = None
        for line in self.headers:
            if line.startswith(b"HTTP/"):
                value = None
            elif line[:12].lower() == b"retry-after:":
                value = line[12:].decode("latin-1").strip()
        return value


#: Headers curl would add on its own that a post to Koala does without.
_NO_HEADERS = [b"Accept:", b"Expect:"]


class CurlError(Exception):
    """A transfer curl could not complete (connect, TLS, proxy, timeout, ...)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"curl error {code}: {message}" if message else f"curl error {code}")
        self.code = code
