"""A real local HTTP server standing in for Koala, for your tests and ours.

``Collector`` listens on loopback, records every request (method, path, headers, body) and
answers like Koala would, or slowly, or with errors, or not at all, so delivery can be
tested against real sockets instead of mocks::

    from koala_middleware import KoalaClient
    from koala_middleware.testing import Collector

    with Collector() as koala:
        client = KoalaClient("pk_test", api_url=koala.url)
        with client.tracker(email="ada@example.com") as t:
            t.track("Signed Up")
        client.flush()
        assert koala.events()[0]["event"] == "Signed Up"

It needs nothing beyond the standard library (an asyncio server in a daemon thread).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

__all__ = ["Collector", "Received", "Responder"]

_PROJECT_PATH = "/web/projects/"


@dataclass
class Received:
    """One request the collector received, and the status it answered (None: no answer)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int | None = None
    at: float = field(default_factory=time.monotonic)
    #: When the answer was written (``time.monotonic()``), None before.
    answered_at: float | None = None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def route(self) -> str:
        """The Koala route, after ``/web/projects/<key>/``: ``batch``, ``accounts/batch``, ..."""
        _, _, rest = self.path.partition(_PROJECT_PATH)
        return rest.partition("/")[2].partition("?")[0]

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


Responder = Callable[[Received], "int | tuple[int, dict[str, str]] | tuple[int, dict[str, str], bytes]"]


class Collector:
    """A Koala stand-in on ``127.0.0.1``; use as a context manager or call start()/stop().

    :param delay: seconds to wait before answering each request (concurrently, not in turn).
    :param status: the status to answer (default 200), or ``respond(received) -> status`` /
        ``(status, headers)`` / ``(status, headers, body)`` for per-request behaviour.
    :param tls: a server-side ``ssl.SSLContext`` to serve HTTPS with (``url`` says https).

    Faults to inject while it runs, each a method: :meth:`down` / :meth:`up` (connection
    refused), :meth:`hang` / :meth:`release` (read requests, never answer), :meth:`slow`
    (answer late), :meth:`answer_with` (another status, or a responder),
    :meth:`fail_next` (the next few requests fail, optionally with headers such as
    ``Retry-After``), :meth:`drip` (answer a byte a second), :meth:`answer_bytes` (huge
    answers); :meth:`reset` undoes all but ``down``.

    It answers Koala's key check (``GET /web/projects/{key}/auth``, what
    ``python -m koala_middleware check`` asks) like any other request (200 by default),
    but with 404 for the keys given to :meth:`reject_keys`.
    """

    def __init__(self, *, delay: float = 0.0, status: int | Responder = 200, tls: ssl.SSLContext | None = None) -> None:
        self._delay = delay
        self._status = status
        self._tls = tls
        self._drip = False
        self._answer_bytes = 0
        self._hang = False
        self._unhang: asyncio.Event | None = None
        self.received: list[Received] = []
        self._accepted = 0
        self._fail_next: list[tuple[int, dict[str, str]]] = []
        self._rejected_keys: set[str] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The ``api_url`` to give ``KoalaClient``."""
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> Collector:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="koala-collector", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the collector did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._close(stop=True), self._loop).result(10)
            assert self._thread is not None
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def down(self) -> None:
        """Stop listening and drop open connections: clients get connection errors."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._close(stop=False), self._loop).result(10)

    def up(self) -> None:
        """Listen again on the same port after :meth:`down`."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    def fail_next(self, count: int, status: int = 503, headers: dict[str, str] | None = None) -> None:
        """Answer the next ``count`` requests with ``status`` (and extra ``headers``)."""
        with self._lock:
            self._fail_next.extend([(status, dict(headers or {}))] * count)

    def reject_keys(self, *keys: str) -> None:
        """Answer the key check (``GET /web/projects/{key}/auth``) for these keys with 404."""
        with self._lock:
            self._rejected_keys.update(keys)

    def hang(self) -> None:
        """Read requests but never answer them, until :meth:`release`."""
        self._hang = True

    def release(self) -> None:
        """Answer again, the held requests included (late)."""
        self._hang = False
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._release)

    def slow(self, seconds: float) -> None:
        """Wait ``seconds`` before answering each request (``slow(0)``: answer at once)."""
        self._delay = seconds

    def answer_with(self, status: int | Responder) -> None:
        """Answer every request with ``status`` from now on, or ask ``respond(received)``."""
        self._status = status

    def drip(self) -> None:
        """Send each answer's status line and headers at once, then its body a byte a second."""
        self._drip = True

    def answer_bytes(self, size: int) -> None:
        """Answer with bodies of ``size`` bytes, streamed (never held in memory)."""
        self._answer_bytes = size

    def reset(self) -> None:
        """Back to answering 200 at once: no hang, no delay, no failures pending."""
        with self._lock:
            self._fail_next.clear()
            self._rejected_keys.clear()
        self._status = 200
        self._delay = 0.0
        self._drip = False
        self._answer_bytes = 0
        self.release()

    # -- what arrived -----------------------------------------------------------------------

    def requests(self, path_suffix: str = "", accepted_only: bool = True) -> list[Received]:
        """What arrived (accepted requests only, by default) whose path ends with ``path_suffix``."""
        with self._lock:
            return [r for r in self.received if r.path.endswith(path_suffix) and (r.accepted or not accepted_only)]

    def batches(self) -> list[dict[str, Any]]:
        """Bodies of the accepted visitor batches (``/batch``), in order of arrival."""
        return self._bodies("batch")

    def account_batches(self) -> list[dict[str, Any]]:
        """Bodies of the accepted account batches (``/accounts/batch``)."""
        return self._bodies("accounts/batch")

    def events(self) -> list[dict[str, Any]]:
        """The events of the accepted visitor batches."""
        return [event for body in self.batches() for event in body.get("events", [])]

    def account_events(self) -> list[dict[str, Any]]:
        """The events of the accepted account batches."""
        return [event for body in self.account_batches() for event in body.get("events", [])]

    def _bodies(self, route: str) -> list[dict[str, Any]]:
        return [r.json() for r in self.requests() if r.route == route]

    def message_ids(self, accepted_only: bool = True) -> list[str]:
        """Every event ``message_id`` received (visitor and account batches), in order.

        With retries in play, compare ``len(ids)`` with ``len(set(ids))`` to see duplicates.
        """
        return [
            event["message_id"]
            for r in self.requests(accepted_only=accepted_only)
            for event in r.json().get("events", [])
        ]

    def wait_for(self, count: int, timeout: float = 10.0, accepted_only: bool = True) -> bool:
        """Wait until ``count`` requests (accepted ones by default) have arrived."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while (self._accepted if accepted_only else len(self.received)) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def clear(self) -> None:
        with self._lock:
            self.received.clear()
            self._accepted = 0

    # -- the server ---------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._unhang = asyncio.Event()
        loop.run_until_complete(self._listen())
        ready.set()
        loop.run_forever()
        loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, backlog=1024, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self, stop: bool) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        if stop:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)

    def _release(self) -> None:
        assert self._unhang is not None
        self._unhang.set()
        self._unhang = asyncio.Event()

    def _answer(self, received: Received) -> tuple[int, dict[str, str], bytes | None]:
        with self._lock:
            if self._fail_next:
                return (*self._fail_next.pop(0), None)
            if received.path.endswith("/auth") and received.path.rsplit("/", 2)[-2] in self._rejected_keys:
                return 404, {}, None
        status = self._status
        result = status(received) if callable(status) else status
        if not isinstance(result, tuple):
            return result, {}, None
        return (result[0], result[1], result[2]) if len(result) == 3 else (result[0], result[1], None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                received = Received(method, path, headers, body)
                with self._changed:
                    self.received.append(received)
                    self._changed.notify_all()
                if self._hang and self._unhang is not None:
                    await self._unhang.wait()
                if self._delay:
                    await asyncio.sleep(self._delay)
                if reader.at_eof() or writer.is_closing():
                    # The client went away while waiting (it timed out, or its process was
                    # killed): as far as it knows, this batch was never delivered.
                    return
                status, extra, payload = self._answer(received)
                with self._changed:
                    received.status = status
                    received.answered_at = time.monotonic()
                    self._accepted += 200 <= status < 300
                    self._changed.notify_all()
                if payload is None:
                    payload = b'{"ok":true}' if status < 300 else b'{"error":"stand-in failure"}'
                size = self._answer_bytes or len(payload)
                out = [
                    f"HTTP/1.1 {status} {_phrase(status)}",
                    f"Content-Length: {size}",
                    "Content-Type: application/json",
                ]
                out += [f"{k}: {v}" for k, v in extra.items()]
                await self._write(writer, ("\r\n".join(out) + "\r\n\r\n").encode(), payload, size)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _write(self, writer: asyncio.StreamWriter, head: bytes, payload: bytes, size: int) -> None:
        """Write an answer: at once, a byte a second (:meth:`drip`), or ``size`` bytes of
        padding streamed in 64 KiB chunks (:meth:`answer_bytes`)."""
        if self._drip:
            writer.write(head)
            for index in range(len(payload)):
                await writer.drain()
                await asyncio.sleep(1.0)
                writer.write(payload[index : index + 1])
        elif self._answer_bytes:
            writer.write(head)
            chunk = b" " * 65536
            for start in range(0, size, len(chunk)):
                await writer.drain()
                writer.write(chunk[: size - start])
        else:
            writer.write(head + payload)
        await writer.drain()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"
