"""A load test through a real server: 20,000 tracked requests, every event accounted for.

uvicorn serves the Starlette fault app; a separate process generates the load over 32
kept-alive loopback connections; the local collector stands in for Koala. The queue is
bounded at 2,000 batches, below what one process can deliver while it also serves 20,000
requests as fast as they come, so both paths are exercised: every event must be either
delivered (exactly once, by message_id) or counted as dropped. Override the size with
``KOALA_LOAD_REQUESTS``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx

from e2e.servers import ROOT, fault_server
from koala_middleware.testing import Collector

REQUESTS = int(os.environ.get("KOALA_LOAD_REQUESTS", "20000"))
CONNECTIONS = 32


def test_every_event_is_delivered_once_or_counted_dropped() -> None:
    with Collector() as koala:
        with fault_server("uvicorn", koala, max_queue_batches=2000, shutdown_timeout=10) as server:
            load = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tests.e2e.apps.faults_loadgen",
                    str(server.port),
                    str(REQUESTS),
                    str(CONNECTIONS),
                ],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert load.returncode == 0, load.stderr
            result = json.loads(load.stdout)
            stats = httpx.get(server.url + "/flush", params={"timeout": 60}, timeout=70).json()
        events = koala.events()
        ids = koala.message_ids()

    print(f"\nload: {result}\nstats: {stats}")
    assert result["ok"] == REQUESTS, result
    assert stats["flushed"] and stats["queued"] == 0
    delivered, dropped = stats["events_delivered"], sum(stats["events_dropped"].values())
    assert delivered + dropped == REQUESTS, "every event is delivered or counted as dropped"
    assert set(stats["dropped"]) <= {"queue_full"} and stats["dropped"].get("queue_full", 0) == dropped
    assert len(ids) == len(set(ids)) == delivered, "what was counted delivered arrived, once"
    numbers = [e["properties"]["n"] for e in events]
    assert len(set(numbers)) == delivered and set(numbers) <= set(range(REQUESTS))
