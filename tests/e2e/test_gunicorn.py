"""The Flask integration under real gunicorn: ``--preload``, 2 workers, threads, loopback.

gunicorn runs ``tests/e2e/apps/flask_app.py`` in a subprocess; Koala is the local collector.
Each test sends its own User-Agent and finds its batches by it, so tests can share a server.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import gunicorn.config
import httpx
import pytest

from e2e.servers import Server, batches_from, collector_env, free_port, ko_id_cookie, serve, wait_until
from koala_middleware.testing import Collector

APP = "tests.e2e.apps.flask_app:app"
# Recent gunicorn opens a control socket at one fixed path per user: concurrent runs would share it.
NO_CONTROL_SOCKET = [
    cli for s in gunicorn.config.KNOWN_SETTINGS if s.name == "control_socket_disable" for cli in s.cli
]


def gunicorn(koala: Collector) -> AbstractContextManager[Server]:
    port = free_port()
    args = ["gunicorn", "--preload", "-w", "2", "--threads", "4", "-b", f"127.0.0.1:{port}", *NO_CONTROL_SOCKET, APP]
    return serve(args, port, env=collector_env(koala))


@pytest.fixture(scope="module")
def server(koala: Collector) -> Iterator[Server]:
    with gunicorn(koala) as running:
        yield running


def user_agent() -> str:
    return f"Mozilla/5.0 (gunicorn-e2e {uuid.uuid4().hex[:8]})"





def test_cookie_for_new_returning_and_forged_visitors(server: Server) -> None:
    new = httpx.get(server.url + "/visitor")
    cookie = ko_id_cookie(new)
    assert cookie == f"ko_id={new.text}; Path=/; Max-Age=31536000; SameSite=Lax"  # host-only on an IP
    returning = httpx.get(server.url + "/visitor", headers={"Cookie": f"a=1; ko_id={new.text}"})
    assert returning.text == new.text and ko_id_cookie(returning) is None
    forged = httpx.get(server.url + "/visitor", headers={"Cookie": "ko_id=forged<>value"})
    assert forged.text not in (new.text, "forged<>value") and "forged" not in (ko_id_cookie(forged) or "forged")
    named = httpx.get(server.url + "/visitor", headers={"Host": "www.example.com"})
    assert "; Domain=example.com;" in (ko_id_cookie(named) or "")


def test_both_preloaded_workers_deliver_with_the_visitors_user_agent(server: Server, koala: Collector) -> None:
    ua = user_agent()
    pids: dict[str, int] = {}
    lock = threading.Lock()

    def ping() -> None:
        response = httpx.get(server.url + "/pid", headers={"User-Agent": ua})  # a new connection each time
        with lock:
            worker = response.text.split()[0]
            pids[worker] = pids.get(worker, 0) + 1

    deadline = time.monotonic() + 30
    while len(pids) < 2 and time.monotonic() < deadline:
        burst = [threading.Thread(target=ping) for _ in range(8)]
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join(15)
    assert len(pids) == 2, f"only one worker answered: {pids}"
    sent = sum(pids.values())
    assert wait_until(lambda: len(batches_from(koala, ua)) == sent), (len(batches_from(koala, ua)), sent)
    received = batches_from(koala, ua)
    assert {str(b["events"][0]["properties"]["pid"]) for b in received} == set(pids)
    assert all(b["ip"] == "127.0.0.1" and len(b["events"]) == 1 for b in received)
    assert all(b["events"][0]["event"] == "Pinged" for b in received)


def test_streaming_stays_streaming_and_its_events_arrive_after_close(
    server: Server, koala: Collector, tmp_path: Path
) -> None:
    ua = user_agent()
    gate = tmp_path / "gate"
    url = f"{server.url}/stream?gate={gate}"
    with httpx.stream("GET", url, headers={"User-Agent": ua}, timeout=20) as response:
        assert ko_id_cookie(response) is not None
        lines = response.iter_lines()
        assert next(lines) == "first"  # arrived while the handler is still waiting on the gate
        assert not gate.exists() and batches_from(koala, ua) == []
        gate.touch()
        assert list(lines) == ["second"]
    assert wait_until(lambda: len(batches_from(koala, ua)) == 1)
    (body,) = batches_from(koala, ua)
    assert body["events"][0]["event"] == "Streamed" and body["events"][0]["properties"] == {"gate_seen": True}


def test_handler_that_raises_gets_a_500_and_its_events_are_delivered(server: Server, koala: Collector) -> None:
    ua = user_agent()
    response = httpx.get(server.url + "/boom", headers={"User-Agent": ua})
    assert response.status_code == 500
    assert wait_until(lambda: len(batches_from(koala, ua)) == 1)
    assert batches_from(koala, ua)[0]["events"][0]["event"] == "Started Checkout"


def test_a_slow_koala_does_not_slow_responses_and_everything_arrives_by_shutdown() -> None:
    ua = user_agent()
    with Collector(delay=2) as slow:
        durations: list[float] = []
        lock = threading.Lock()

        def visitor(server: Server) -> None:
            for _ in range(4):
                started = time.monotonic()
                response = httpx.get(server.url + "/pid", headers={"User-Agent": ua}, timeout=10)
                elapsed = time.monotonic() - started
                assert response.status_code == 200
                with lock:
                    durations.append(elapsed)

        with gunicorn(slow) as server:
            threads = [threading.Thread(target=visitor, args=(server,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert len(durations) == 16
            assert max(durations) < 1.0, sorted(durations)  # Koala answers after 2 s
            assert server.terminate() == 0  # SIGTERM now: the workers flush as they exit
        accepted = [r for r in slow.requests() if r.headers.get("user-agent") == ua]
        assert len(accepted) == 16, server.output[-2000:]
