"""What only gunicorn shows: with ``--preload``, each forked worker delivers on its own.

The tests every server passes (cookies, streaming, errors, a slow Koala, SIGTERM) are in
``test_servers.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from e2e.servers import Server, batches_from, run_gunicorn, user_agent, wait_until
from koala_middleware.testing import Collector

APP = "tests.e2e.apps.flask_app:app"


@pytest.fixture(scope="module")
def server(koala: Collector) -> Iterator[Server]:
    with run_gunicorn(koala, APP) as running:
        yield running


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
