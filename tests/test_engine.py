"""The delivery engine's own promises: which engine runs (said once at DEBUG), nothing
imported before a path needs it, and ``check`` posting through the same engine as
``sync=True`` (its proxy, tunnel and TLS are tested in test_proxy.py)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import uuid

import pytest

from koala_middleware import KoalaClient
from koala_middleware.testing import Collector

HEAVY = ["httpx", "pycurl", "anyio", "certifi", "h11", "sniffio", "httpcore"]


def test_import_loads_no_http_library() -> None:
    """``import koala_middleware`` (and its WSGI/ASGI/Django glue) loads no HTTP stack: dry-run
    and WSGI-only processes never pay for one."""
    code = (
        "import sys, json, koala_middleware, koala_middleware.wsgi, koala_middleware.asgi;"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []


@pytest.mark.parametrize("sync", [False, True], ids=["background", "sync"])
def test_the_engine_that_runs_is_said_once_at_debug(
    engine: str, sync: bool, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="koala_middleware")
    client = KoalaClient("pk_test", api_url=collector.url, sync=sync)
    for _ in range(3):
        with client.tracker(profile_id=str(uuid.uuid4()), user_agent="UA/engine") as tracker:
            tracker.track("Engine")
    assert client.flush(10)
    client.shutdown(2)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("delivery engine:")]
    expected = "curl" if engine == "curl" and not sync else "python"
    assert len(said) == 1 and said[0].startswith(f"delivery engine: {expected}")
    assert client.stats.delivered == 3


def deliver_one_by_one(client: KoalaClient, event: str, count: int) -> None:
    """``count`` visitors' events, each flushed before the next is recorded (so each batch may
    reuse the connection the one before it used); then the client is shut down."""
    for _ in range(count):
        with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
            tracker.track(event)
        assert client.flush(10)
    client.shutdown(2)


def test_answers_past_the_cap_drop_their_connection_and_delivery_goes_on(engine: str, collector: Collector) -> None:
    collector.answer_bytes(100_000)
    client = KoalaClient("pk_test", api_url=collector.url, max_retries=0)
    deliver_one_by_one(client, "Big answer", 3)
    assert client.stats.delivered == 3 and not client.stats.dropped


class ClosingKoala:
    """A raw HTTP/1.1 server that answers the first request of each connection (keeping it
    open) and closes the connection at the second without answering: what a server whose
    idle timeout fires as a kept-alive connection is reused looks like."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.answered = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            connection, _ = self.listener.accept()
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _handle(self, connection: socket.socket) -> None:
        with connection:
            if not _read_request(connection):
                return
            self.answered += 1
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            _read_request(connection)  # the reuse: closed unanswered


def _read_request(connection: socket.socket) -> bool:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += connection.recv(65536)
    return True


@pytest.mark.parametrize("sync", [False, True], ids=["background", "sync"])
def test_a_kept_alive_connection_closed_under_a_request_is_retried_once_on_a_new_one(engine: str, sync: bool) -> None:
    koala = ClosingKoala()
    client = KoalaClient("pk_test", api_url=koala.url, sync=sync, max_retries=0)
    deliver_one_by_one(client, "Reused", 3)
    assert client.stats.delivered == 3 and not client.stats.dropped
    assert koala.answered == 3


def test_the_request_written_by_hand_is_what_h11_reads_back() -> None:
    """The default engine writes requests itself (h11 only parses answers): an h11 server
    reads them back as sent, body and all, and the h11 client is left ready for the answer."""
    import h11

    from koala_middleware._delivery._h11 import Exchange

    headers = [(b"Host", b"api.example"), (b"User-Agent", b"Mozilla/5.0 (caf\xc3\xa9)"), (b"Content-Length", b"2")]
    client = h11.Connection(h11.CLIENT)
    data = Exchange(client).start(b"POST", b"/web/projects/k/batch", headers, b"{}")
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    request = server.next_event()
    assert isinstance(request, h11.Request)
    assert (request.method, request.target) == (b"POST", b"/web/projects/k/batch")
    assert [(name, value) for name, value in request.headers] == [(n.lower(), v) for n, v in headers]
    assert server.next_event() == h11.Data(data=b"{}")
    assert type(server.next_event()) is h11.EndOfMessage
    assert client.our_state is h11.DONE and client.their_state is h11.SEND_RESPONSE


@pytest.mark.parametrize(
    ("target", "header"),
    [(b"/a\r\nX-Evil: 1", b"ok"), (b"/a", b"ok\r\nX-Evil: 1"), (b"/a", b"ok\nX-Evil: 1"), (b"/a b", b"ok")],
)
def test_a_request_that_could_be_split_is_not_written(target: bytes, header: bytes) -> None:
    from koala_middleware._delivery._engine import EngineError
    from koala_middleware._delivery._h11 import serialize

    with pytest.raises(EngineError):
        serialize(b"POST", target, [(b"Host", b"h"), (b"User-Agent", header)], b"")
