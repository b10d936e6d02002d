"""The ASGI middleware under real uvicorn on loopback, Koala being the local collector.

uvicorn runs ``tests/e2e/apps/fastapi_app.py`` (FastAPI with a lifespan of its own) or
``tests/e2e/apps/asgi_app.py`` (a bare ASGI app) in a subprocess. Each test sends its own
User-Agent and finds its batches by it, so tests can share a server.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from e2e.servers import Server, batches_from, collector_env, free_port, ko_id_cookie, serve, wait_until
from koala_middleware.testing import Collector

FASTAPI_APP = "tests.e2e.apps.fastapi_app:app"
BARE_APP = "tests.e2e.apps.asgi_app:app"


def uvicorn(koala: Collector, app: str, *options: str) -> AbstractContextManager[Server]:
    port = free_port()
    args = ["uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--no-access-log", *options]
    return serve(args, port, env=collector_env(koala))


@pytest.fixture(scope="module")
def server(koala: Collector) -> Iterator[Server]:
    # Trust forwarded headers only from an address no test request comes from.
    with uvicorn(koala, FASTAPI_APP, "--forwarded-allow-ips", "192.0.2.1") as running:
        yield running


def user_agent() -> str:
    return f"Mozilla/5.0 (uvicorn-e2e {uuid.uuid4().hex[:8]})"





def message_ids(koala: Collector, ua: str) -> list[str]:
    return [e["message_id"] for b in batches_from(koala, ua) for e in b.get("events", [])]


# -- one shared server ----------------------------------------------------------------------


def test_cookie_for_new_returning_and_forged_visitors_and_several_cookie_headers(server: Server) -> None:
    new = httpx.get(server.url + "/visitor")
    assert ko_id_cookie(new) == f"ko_id={new.text}; Path=/; Max-Age=31536000; SameSite=Lax"  # host-only on an IP
    returning = httpx.get(server.url + "/visitor", headers={"Cookie": f"a=1; ko_id={new.text}"})
    assert returning.text == new.text and ko_id_cookie(returning) is None
    # Two Cookie header lines (as HTTP/2 clients send them): the id in the second one counts.
    split = httpx.get(server.url + "/visitor", headers=[("Cookie", "a=1"), ("Cookie", f"ko_id={new.text}")])
    assert split.text == new.text and ko_id_cookie(split) is None
    forged = httpx.get(server.url + "/visitor", headers={"Cookie": "ko_id=forged<>value"})
    assert forged.text not in (new.text, "forged<>value") and "forged" not in (ko_id_cookie(forged) or "forged")
    named = httpx.get(server.url + "/visitor", headers={"Host": "www.example.com"})
    assert "; Domain=example.com;" in (ko_id_cookie(named) or "")


def test_the_apps_own_set_cookies_survive(server: Server) -> None:
    response = httpx.get(server.url + "/cookies")
    assert [c.split("=")[0] for c in response.headers.get_list("set-cookie")] == ["session", "theme", "ko_id", "ko_id_server"]


def test_events_arrive_with_the_visitors_user_agent_and_an_untrusted_forwarded_for_is_ignored(
    server: Server, koala: Collector
) -> None:
    ua = user_agent()
    sent = [
        httpx.get(server.url + path, headers={"User-Agent": ua, "X-Forwarded-For": "198.51.100.9"}).text
        for path in ("/track", "/sync")
    ]
    assert wait_until(lambda: len(batches_from(koala, ua)) == 2)
    assert sorted(message_ids(koala, ua)) == sorted(sent)  # the sync handler's too
    assert {b["ip"] for b in batches_from(koala, ua)} == {"127.0.0.1"}  # 127.0.0.1 is not a trusted proxy here


def test_streaming_stays_streaming_and_its_events_arrive_after_the_last_chunk(
    server: Server, koala: Collector, tmp_path: Path
) -> None:
    ua = user_agent()
    gate = tmp_path / "gate"
    with httpx.stream("GET", server.url + "/stream", params={"gate": str(gate)}, headers={"User-Agent": ua},
                      timeout=20) as response:
        assert ko_id_cookie(response) is not None
        lines = response.iter_lines()
        assert next(lines) == "first"  # arrived while the generator is still waiting on the gate
        assert not gate.exists() and batches_from(koala, ua) == []
        gate.touch()
        assert list(lines) == ["second"]
    assert wait_until(lambda: len(batches_from(koala, ua)) == 1)
    (event,) = batches_from(koala, ua)[0]["events"]
    assert event["event"] == "Streamed" and event["properties"] == {"gate_seen": True, "current": True}


def test_handler_that_raises_gets_a_500_and_its_events_are_delivered(server: Server, koala: Collector) -> None:
    ua = user_agent()
    # A returning visitor: Starlette answers the exception outside the middleware, so a new
    # visitor's cookie never goes out and their events are not sent under an id no browser has.
    visitor = "5e7c1b2a-9f3d-4c8e-a1b2-c3d4e5f6a7b8"
    for cookie in (f"ko_id={visitor}", None):
        headers = {"User-Agent": ua, **({"Cookie": cookie} if cookie else {})}
        assert httpx.get(server.url + "/boom", headers=headers).status_code == 500
    assert wait_until(lambda: len(batches_from(koala, ua)) == 1)
    (batch,) = batches_from(koala, ua)
    assert batch["events"][0]["event"] == "Started Checkout" and batch["profile_id"] == visitor


# -- a server per test: shutdown ----------------------------------------------------------
#
# uvicorn ends its process on SIGTERM by re-raising the signal once it has shut down (so the
# exit status is -SIGTERM), and no interpreter exit hook runs after that: batches pending at
# SIGTERM arrive only if the middleware flushed them during the lifespan shutdown.

STOPPED = (0, -signal.SIGTERM)


def shut_down_cleanly(server: Server) -> None:
    stopping = time.monotonic()
    assert server.terminate() in STOPPED, server.output[-3000:]
    assert time.monotonic() - stopping < 15
    assert "Application shutdown complete" in server.output, server.output[-3000:]


def test_a_slow_koala_does_not_slow_responses_and_sigterm_delivers_everything() -> None:
    ua = user_agent()
    with Collector(delay=2) as slow:  # Koala answers each batch after 2 s
        durations: list[float] = []
        sent: list[str] = []
        lock = threading.Lock()

        def visitor(server: Server) -> None:
            for _ in range(4):
                started = time.monotonic()
                # uvicorn trusts forwarded headers from 127.0.0.1 by default (--proxy-headers).
                headers = {"User-Agent": ua, "X-Forwarded-For": "198.51.100.9"}
                response = httpx.get(server.url + "/track", headers=headers, timeout=10)
                elapsed = time.monotonic() - started
                assert response.status_code == 200
                with lock:
                    durations.append(elapsed)
                    sent.append(response.text)

        with uvicorn(slow, FASTAPI_APP) as server:
            threads = [threading.Thread(target=visitor, args=(server,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert len(durations) == 16
            assert max(durations) < 1.0, sorted(durations)
            assert not slow.requests()  # none answered yet: all 16 are pending at SIGTERM
            shut_down_cleanly(server)  # the FastAPI app's own lifespan does not get in the way
        assert sorted(message_ids(slow, ua)) == sorted(sent), server.output[-3000:]  # all, none twice
        assert {b["ip"] for b in batches_from(slow, ua)} == {"198.51.100.9"}
        assert "koala-e2e: the app's lifespan shutdown ran" in server.output


def test_sigterm_delivers_pending_batches_of_a_bare_app_that_does_not_speak_lifespan() -> None:
    ua = user_agent()
    with Collector(delay=0.5) as slow:
        with uvicorn(slow, BARE_APP) as server:
            with httpx.Client(headers={"User-Agent": ua}) as browser:
                sent = [browser.get(server.url + "/track").text for _ in range(20)]
            shut_down_cleanly(server)
        ids = message_ids(slow, ua)
        assert len(ids) == len(set(ids)) == 20 and set(ids) == set(sent), server.output[-3000:]
        assert "lifespan' protocol appears unsupported" not in server.output  # the middleware answered it
