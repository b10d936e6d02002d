"""What visitors send can't stop delivery: each request is built once, before any network call.

A User-Agent with bytes above 0x7F (WSGI and ASGI hand header values over as latin-1 text)
is delivered, never retried, never pausing the sender; any error while building a request
costs that batch alone (``error``). Through real uvicorn and gunicorn, and in sync mode.
"""

from __future__ import annotations

import logging
import uuid

import httpx
import pytest

from e2e.servers import fault_server
from helpers import FAST_RETRIES
from koala_middleware import Batch, KoalaClient
from koala_middleware._delivery._request import header_text
from koala_middleware._delivery._sender import LOG_UNAVAILABLE
from koala_middleware._delivery._stats import LOG_DROPPED
from koala_middleware.testing import Collector

#: Every engine passes the same tests (conftest.py's ``engine``).
pytestmark = pytest.mark.usefixtures("engine")

# "café" as UTF-8 bytes, as a WSGI/ASGI server hands it over (one character per byte).
UTF8_UA = "Mozilla/5.0 (caf\xc3\xa9)"
# A lone 0xE9 (latin-1 "é"): not UTF-8, so sent escaped.
LATIN1_UA = "Mozilla/5.0 (caf\xe9)"


def wire(koala: Collector, ua_marker: str) -> list[bytes]:
    """The User-Agent bytes of the accepted requests whose UA contains ``ua_marker``."""
    # The collector decodes request heads as latin-1, so encoding back gives the wire bytes.
    return [r.headers["user-agent"].encode("latin-1") for r in koala.requests() if ua_marker in r.headers["user-agent"]]


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ("Mozilla/5.0 (X11; Linux x86_64)", "Mozilla/5.0 (X11; Linux x86_64)"),
        (UTF8_UA, "Mozilla/5.0 (café)"),  # sent as the same bytes: c3 a9
        (LATIN1_UA, "Mozilla/5.0 (caf%E9)"),
        ("a\tb", "a\tb"),
        ("bad\r\nX-Injected: 1", "bad%0D%0AX-Injected: 1"),
        ("nul\x00\x7f", "nul%00%7F"),
        ("emoji \U0001f600", "emoji \U0001f600"),  # a developer's text beyond latin-1: UTF-8
    ],
)
def test_header_text(value: str, sent: str) -> None:
    assert header_text(value) == sent


def one_odd_among_normal(client: KoalaClient, odd_ua: str, normal: int = 100) -> None:
    for n in range(normal + 1):
        ua = odd_ua if n == normal // 2 else f"Mozilla/5.0 (normal {n})"
        with client.tracker(profile_id=str(uuid.uuid4()), user_agent=ua) as tracker:
            tracker.track("Viewed", {"n": n})


@pytest.mark.parametrize("sync", [False, True], ids=["background", "sync"])
@pytest.mark.parametrize("odd_ua", [UTF8_UA, LATIN1_UA], ids=["utf8", "latin1"])
def test_a_user_agent_above_0x7f_is_delivered_never_retried(
    collector: Collector, sync: bool, odd_ua: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = KoalaClient("pk_test", api_url=collector.url, sync=sync, **FAST_RETRIES)
    one_odd_among_normal(client, odd_ua)
    assert client.flush(10)
    stats = client.stats
    client.shutdown(1)
    assert (stats.delivered, stats.retried, stats.dropped) == (101, 0, {})
    assert wire(collector, "(caf") == [header_text(odd_ua).encode()]
    assert LOG_UNAVAILABLE not in [r.msg for r in caplog.records]


@pytest.mark.parametrize("sync", [False, True], ids=["background", "sync"])
def test_a_batch_no_request_can_carry_is_dropped_alone(
    collector: Collector, sync: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A lone surrogate has no bytes at all: building fails, for that batch only."""
    caplog.set_level(logging.WARNING, logger="koala_middleware")
    errors: list[str] = []
    client = KoalaClient(
        "pk_test", api_url=collector.url, sync=sync, on_error=lambda b, e: errors.append(e.reason), **FAST_RETRIES
    )
    bad = [Batch("/batch", b'{"profile_id":"x","events":[]}', "UA \udc80") for _ in range(3)]
    for n in range(50):
        with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
            tracker.track("Viewed", {"n": n})
        if n % 20 == 0:
            client._send(bad[n // 20])
    assert client.flush(10)
    stats = client.stats
    client.shutdown(1)
    assert (stats.delivered, stats.retried, stats.dropped) == (50, 0, {"error": 3})
    assert errors == ["error"] * 3
    messages = [r.msg for r in caplog.records]
    assert LOG_UNAVAILABLE not in messages, "a local error is no Koala outage"
    assert messages.count(LOG_DROPPED) == 1, "logged once per interval"
    assert "UnicodeEncodeError" in caplog.text and len(collector.requests(accepted_only=False)) == 50


# -- through real servers ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_a_visitor_user_agent_above_0x7f_through_a_real_server(collector: Collector, kind: str) -> None:
    """1 request with ``café`` (UTF-8 bytes) in its User-Agent among 100 normal ones."""
    odd = b"Mozilla/5.0 (caf\xc3\xa9 " + kind.encode() + b")"
    with fault_server(kind, collector, **FAST_RETRIES) as server, httpx.Client(base_url=server.url) as http:
        for n in range(101):
            ua = odd if n == 50 else f"Mozilla/5.0 (normal {n})".encode()
            assert http.get("/track", params={"n": n}, headers={"User-Agent": ua}).status_code == 200
        stats = http.get("/flush", params={"timeout": 10}).json()
    assert (stats["delivered"], stats["retried"], stats["dropped"]) == (101, 0, {})
    assert wire(collector, "(caf") == [odd], "the header carries the bytes as received"
