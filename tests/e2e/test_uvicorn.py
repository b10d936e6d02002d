"""The ASGI middleware under real uvicorn on loopback, Koala being the local collector.

uvicorn runs ``tests/e2e/apps/fastapi_app.py`` (FastAPI with a lifespan of its own) or
``tests/e2e/apps/asgi_app.py`` (a bare ASGI app) in a subprocess. Each test sends its own
User-Agent and finds its batches by it, so tests can share a server.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from e2e.servers import Server, batches_from, run_uvicorn, user_agent, wait_until
from koala_middleware.testing import Collector

FASTAPI_APP = "tests.e2e.apps.fastapi_app:app"
BARE_APP = "tests.e2e.apps.asgi_app:app"


@pytest.fixture(scope="module")
def server(koala: Collector) -> Iterator[Server]:
    # Trust forwarded headers only from an address no test request comes from.
    with run_uvicorn(koala, FASTAPI_APP, "--forwarded-allow-ips", "192.0.2.1") as running:
        yield running


def message_ids(koala: Collector, ua: str) -> list[str]:
    return [e["message_id"] for b in batches_from(koala, ua) for e in b.get("events", [])]


# -- one shared server ----------------------------------------------------------------------


def test_the_apps_own_set_cookies_survive(server: Server) -> None:
    response = httpx.get(server.url + "/cookies")
    assert [c.split("=")[0] for c in response.headers.get_list("set-cookie")] == [
        "session",
        "theme",
        "ko_id",
        "ko_id_server",
    ]


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


# -- a server per test: shutdown ----------------------------------------------------------
#
# uvicorn ends its process on SIGTERM by re-raising the signal once it has shut down (so the
# exit status is -SIGTERM), and no interpreter exit hook runs after that: batches pending at
# SIGTERM arrive only if the middleware flushed them during the lifespan shutdown.


def test_sigterm_after_a_slow_koala_runs_the_app_s_own_lifespan_shutdown_too() -> None:
    with Collector(delay=2) as slow:
        with run_uvicorn(slow, FASTAPI_APP) as server:
            sent = httpx.get(server.url + "/track", headers={"X-Forwarded-For": "198.51.100.9"}).text
            server.stop_cleanly()  # the FastAPI app's own lifespan does not get in the way
        assert [e["message_id"] for b in slow.batches() for e in b["events"]] == [sent]
        # uvicorn trusts forwarded headers from 127.0.0.1 by default (--proxy-headers).
        assert [b["ip"] for b in slow.batches()] == ["198.51.100.9"]
        assert "Application shutdown complete" in server.output, server.output[-3000:]
        assert "koala-e2e: the app's lifespan shutdown ran" in server.output


def test_sigterm_delivers_pending_batches_of_a_bare_app_that_does_not_speak_lifespan() -> None:
    ua = user_agent()
    with Collector(delay=0.5) as slow:
        with run_uvicorn(slow, BARE_APP) as server:
            with httpx.Client(headers={"User-Agent": ua}) as browser:
                sent = [browser.get(server.url + "/track").text for _ in range(20)]
            server.stop_cleanly()
        ids = message_ids(slow, ua)
        assert len(ids) == len(set(ids)) == 20 and set(ids) == set(sent), server.output[-3000:]
        assert "lifespan' protocol appears unsupported" not in server.output  # the middleware answered it
