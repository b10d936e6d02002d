"""What every server must show, run under real gunicorn (the Flask app, ``--preload``,
2 workers, threads) and real uvicorn (the FastAPI app) on loopback, Koala being the local
collector. Each test sends its own User-Agent and finds its batches by it, so tests share a
server. What only one server has is in ``test_gunicorn.py`` / ``test_uvicorn.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from e2e.servers import Server, batches_from, ko_id_cookie, run_gunicorn, run_uvicorn, user_agent, wait_until
from koala_middleware.testing import Collector

#: How each server is started, with the app the tests below expect.
SERVERS: dict[str, Callable[[Collector], AbstractContextManager[Server]]] = {
    "gunicorn": lambda koala: run_gunicorn(koala, "tests.e2e.apps.flask_app:app"),
    "uvicorn": lambda koala: run_uvicorn(koala, "tests.e2e.apps.fastapi_app:app"),
}


@pytest.fixture(scope="module", params=sorted(SERVERS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def server(kind: str, koala: Collector) -> Iterator[Server]:
    with SERVERS[kind](koala) as running:
        yield running


def test_cookie_for_new_returning_and_forged_visitors(server: Server) -> None:
    new = httpx.get(server.url + "/visitor")
    assert ko_id_cookie(new) == f"ko_id={new.text}; Path=/; Max-Age=31536000; SameSite=Lax"  # host-only on an IP
    returning = httpx.get(server.url + "/visitor", headers={"Cookie": f"a=1; ko_id={new.text}"})
    assert returning.text == new.text and ko_id_cookie(returning) is None
    # Two Cookie header lines (as HTTP/2 clients send them): uvicorn hands both over and the id
    # in the second one counts. gunicorn joins them with "," into one value, and a "," belongs
    # to a cookie's value (RFC 6265bis; browsers send one line over HTTP/1.1): a new visitor.
    split = httpx.get(server.url + "/visitor", headers=[("Cookie", "a=1"), ("Cookie", f"ko_id={new.text}")])
    if "gunicorn" in " ".join(map(str, server.proc.args)):
        assert split.text != new.text and ko_id_cookie(split) is not None
    else:
        assert split.text == new.text and ko_id_cookie(split) is None
    forged = httpx.get(server.url + "/visitor", headers={"Cookie": "ko_id=forged<>value"})
    assert forged.text not in (new.text, "forged<>value") and "forged" not in (ko_id_cookie(forged) or "forged")
    named = httpx.get(server.url + "/visitor", headers={"Host": "www.example.com"})
    assert "; Domain=example.com;" in (ko_id_cookie(named) or "")


def test_streaming_stays_streaming_and_its_events_arrive_after_the_last_chunk(
    server: Server, koala: Collector, tmp_path: Path
) -> None:
    ua = user_agent()
    gate = tmp_path / "gate"
    with httpx.stream(
        "GET", server.url + "/stream", params={"gate": str(gate)}, headers={"User-Agent": ua}, timeout=20
    ) as response:
        assert ko_id_cookie(response) is not None
        lines = response.iter_lines()
        assert next(lines) == "first"  # arrived while the handler is still waiting on the gate
        assert not gate.exists() and batches_from(koala, ua) == []
        gate.touch()
        assert list(lines) == ["second"]
    assert wait_until(lambda: len(batches_from(koala, ua)) == 1)
    (event,) = batches_from(koala, ua)[0]["events"]
    assert event["event"] == "Streamed" and event["properties"] == {"gate_seen": True, "current": True}


def test_handler_that_raises_gets_a_500_and_its_events_are_delivered(server: Server, koala: Collector) -> None:
    ua = user_agent()
    # A returning visitor: Starlette answers the exception outside the middleware, so a new
    # visitor's cookie never goes out there and their events are not sent under an id no
    # browser has (tests/test_fastapi.py); Flask's 500 does carry it.
    visitor = "5e7c1b2a-9f3d-4c8e-a1b2-c3d4e5f6a7b8"
    response = httpx.get(server.url + "/boom", headers={"User-Agent": ua, "Cookie": f"ko_id={visitor}"})
    assert response.status_code == 500
    assert wait_until(lambda: len(batches_from(koala, ua)) == 1)
    (batch,) = batches_from(koala, ua)
    assert batch["events"][0]["event"] == "Started Checkout" and batch["profile_id"] == visitor


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_a_slow_koala_does_not_slow_responses_and_sigterm_delivers_everything(name: str) -> None:
    """16 tracked requests while Koala answers after 2 s: every response is fast, none is
    delivered yet at SIGTERM, and all arrive, once each, before the server has exited
    (gunicorn's workers flush at exit; uvicorn's at lifespan shutdown)."""
    ua = user_agent()
    with Collector(delay=2) as slow:
        durations: list[float] = []
        sent: list[str] = []
        lock = threading.Lock()

        def visitor(server: Server) -> None:
            for _ in range(4):
                started = time.monotonic()
                response = httpx.get(server.url + "/track", headers={"User-Agent": ua}, timeout=10)
                elapsed = time.monotonic() - started
                assert response.status_code == 200
                with lock:
                    durations.append(elapsed)
                    sent.append(response.text)

        with SERVERS[name](slow) as server:
            threads = [threading.Thread(target=visitor, args=(server,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert len(durations) == 16
            assert max(durations) < 1.0, sorted(durations)  # Koala answers after 2 s
            assert not slow.requests()  # none answered yet: all 16 are pending at SIGTERM
            server.stop_cleanly()
        ids = [e["message_id"] for b in batches_from(slow, ua) for e in b["events"]]
        assert sorted(ids) == sorted(sent), server.output[-3000:]  # all, none twice
