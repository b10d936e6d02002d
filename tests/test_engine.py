"""The delivery engine's own promises: which engine runs (said once at DEBUG), nothing
imported before a path needs it, and ``check`` posting through the same engine as
``sync=True`` (its proxy, tunnel and TLS are tested in test_proxy.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
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


def test_answers_past_the_cap_drop_their_connection_and_delivery_goes_on(engine: str, collector: Collector) -> None:
    collector.answer_bytes(100_000)
    client = KoalaClient("pk_test", api_url=collector.url, max_retries=0)
    for _ in range(3):
        with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
            tracker.track("Big answer")
        assert client.flush(10)
    client.shutdown(2)
    assert client.stats.delivered == 3 and not client.stats.dropped
