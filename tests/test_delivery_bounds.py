"""What Koala (or a network in between) answers can't stop the sender or leak into logs.

``Retry-After`` is a deadline other successes don't cancel; ``max_queue_bytes`` bounds all
a queued batch holds; an error log carries a short, redacted excerpt of Koala's answer.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import sys
import threading
import time
import tracemalloc
import uuid

import pytest

from e2e.servers import wait_until
from helpers import FAST_RETRIES
from koala_middleware import Batch, KoalaClient, Tracker
from koala_middleware._delivery._stats import EXCERPT_CHARS, LOG_DROPPED
from koala_middleware.testing import Collector, Received

#: Every engine passes the same tests (conftest.py's ``engine``).
pytestmark = pytest.mark.usefixtures("engine")


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_holds_every_request_even_while_others_succeed(collector: Collector, status: int) -> None:
    """20 batches in flight, 5 answered ``Retry-After: 2``, the 15 others succeed right after:
    no request starts for 2 s (timestamps taken at the collector)."""
    client = KoalaClient("pk_test", api_url=collector.url, backoff_base=0.01, max_backoff=5, timeout=5)
    collector.slow(0.5)  # all 20 in flight together; the first 5 answered are refused
    collector.fail_next(5, status, {"Retry-After": "2"})
    for n in range(20):
        with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
            tracker.track("Viewed", {"n": n})
    assert collector.wait_for(20, accepted_only=False, timeout=5)
    assert collector.wait_for(15)
    # The client has read the refusals (answers on the wire are not read yet).
    assert wait_until(lambda: client.stats.retried == 5 and client.stats.delivered == 15, timeout=5)
    collector.slow(0.0)
    for n in range(5):  # more to send while the hold lasts
        with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
            tracker.track("Later", {"n": n})
    assert client.flush(10)
    client.shutdown(1)
    received = collector.requests(accepted_only=False)
    refused = [r.answered_at for r in received[:20] if r.status == status]
    assert len(refused) == 5 and all(at is not None for at in refused)
    first_refusal = min(at for at in refused if at is not None)
    started_after = [r.at for r in received[20:]]
    timeline = [(round(r.at - first_refusal, 3), r.status) for r in received]
    assert len(started_after) == 10, f"the 5 refused batches again, and the 5 later ones: {timeline}"
    assert min(started_after) - first_refusal >= 1.95, f"no request starts within Retry-After: {timeline}"
    stats = client.stats
    assert (stats.delivered, stats.retried, stats.dropped) == (25, 5, {})


def test_retry_after_is_a_deadline_capped_by_max_backoff(collector: Collector) -> None:
    client = KoalaClient("pk_test", api_url=collector.url, backoff_base=0.01, max_backoff=0.5, timeout=5)
    collector.fail_next(1, 429, {"Retry-After": "3600"})
    with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
        tracker.track("Viewed")
    assert client.flush(5), "an hour-long Retry-After is capped at max_backoff"
    first, second = collector.requests(accepted_only=False)
    assert first.answered_at is not None and second.at - first.answered_at >= 0.45
    client.shutdown(1)


def test_max_queue_bytes_bounds_everything_a_queued_batch_holds(collector: Collector) -> None:
    """64 KB User-Agents while Koala is down: the memory held stays within the bound."""
    bound = 1024 * 1024
    client = KoalaClient("pk_test", api_url=collector.url, max_queue_bytes=bound, backoff_base=1, max_backoff=1)
    try:
        with client.tracker(profile_id=str(uuid.uuid4())) as tracker:  # the sender is up
            tracker.track("Warm-up")
        assert client.flush(5)
        collector.down()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for n in range(200):
            user_agent = f"Mozilla/5.0 ({n}) " + "x" * 64 * 1024  # each request its own
            body = json.dumps({"profile_id": str(uuid.uuid4()), "events": [{"message_id": str(n)}]}).encode()
            client._send(Batch("/batch", body, user_agent, (str(uuid.uuid4()),)))
        del user_agent, body
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        stats = client.stats
        assert stats.enqueued + stats.dropped["queue_bytes_full"] == 201 and stats.enqueued > 2
        assert client._sender._queue.pending_bytes <= bound
        assert held <= bound, f"{held / 1e6:.1f} MB held under a {bound / 1e6:.1f} MB bound"
    finally:
        client.shutdown(0.5)


def test_a_rejection_log_carries_a_short_excerpt_without_the_batch_s_email_ids_or_ip(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """A Koala that echoes the request puts none of it in the host's error log."""

    def echo(received: Received) -> tuple[int, dict[str, str], bytes]:
        return 400, {}, b"bad request, you sent:\r\n" + received.body + b" and " + b"!" * 5000

    collector.answer_with(echo)
    caplog.set_level(logging.WARNING, logger="koala_middleware")
    details: list[str] = []
    client = KoalaClient(
        "pk_test", api_url=collector.url, on_error=lambda b, e: details.append(e.detail), **FAST_RETRIES
    )
    profile_id = str(uuid.uuid4())
    tracker = Tracker(client, profile_id, user_agent="UA/echo", ip="203.0.113.7")
    tracker.identify("ada.lovelace@example.com", {"plan": "pro"})
    message_id = tracker.track("Signed Up", {"coupon": "SECRET-42"})
    client._send_tracker(tracker)
    assert client.flush(5)
    client.shutdown(1)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.msg == LOG_DROPPED
    message = record.getMessage()
    for text in (message, details[0]):
        assert "HTTP 400" in text and "bad request, you sent:" in text
        for secret in ("ada.lovelace@example.com", profile_id, "203.0.113.7", message_id, "SECRET-42"):
            assert secret not in text
        assert "\r" not in text and "\n" not in text
    excerpt = details[0].split("not retried: ", 1)[1]
    assert len(excerpt) <= EXCERPT_CHARS


def test_submits_racing_a_hold_are_all_delivered(collector: Collector) -> None:
    """Batches handed over from many threads during a Retry-After hold all arrive after it."""
    client = KoalaClient("pk_test", api_url=collector.url, backoff_base=0.01, max_backoff=5, timeout=5)
    collector.fail_next(1, 503, {"Retry-After": "1"})
    with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
        tracker.track("First")
    assert collector.wait_for(1, accepted_only=False)

    def burst() -> None:
        for _ in range(20):
            with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
                tracker.track("During")

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert client.flush(10)
    client.shutdown(1)
    assert client.stats.delivered == 81 and len(collector.requests()) == 81


# -- answers that never end, or never stop ------------------------------------------------------


@pytest.mark.parametrize("sync", [False, True], ids=["background", "sync"])
def test_an_answer_dripping_1_byte_a_second_ends_each_attempt_within_timeout(collector: Collector, sync: bool) -> None:
    """Status line and headers at once, then the body at 1 byte/s: each attempt ends within
    ``timeout`` (plus a little), the batch is retried then counted, and the sender goes on.

    The answer is 11 bytes, so it would take 11 s in full: 3 s (1 s of timeout, 0.1 s of
    backoff, the rest for a busy machine) tells the deadline apart from a per-read timeout."""
    collector.drip()
    client = KoalaClient(
        "pk_test",
        api_url=collector.url,
        sync=sync,
        timeout=1.0,
        max_retries=2,
        backoff_base=0.05,
        max_backoff=0.1,
        retry_for=0,  # a lone batch timing out is Koala failing: retry_for would keep it
    )
    started = time.monotonic()
    with client.tracker(profile_id=str(uuid.uuid4())) as tracker:  # the probe, once the first fails
        tracker.track("Dripped")
    assert client.flush(10)
    attempts = collector.requests(accepted_only=False)
    if sync:  # one budget of `timeout` for the whole batch
        assert len(attempts) == 1 and time.monotonic() - started < 3.0
    else:
        assert len(attempts) == 3
        gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(attempts)]
        assert all(gap < 3.0 for gap in gaps), gaps
    assert client.stats.dropped == {"retries_exhausted": 1} and client.stats.delivered == 0
    collector.reset()
    with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
        tracker.track("After")
    assert client.flush(5) and client.stats.delivered == 1, "the sender never stalls"
    client.shutdown(1)


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("sync", [False, True], ids=["background", "sync"])
def test_a_256_mb_answer_costs_little_memory(collector: Collector, sync: bool) -> None:
    """Bodies are read up to a small cap; past it the connection is dropped, not drained."""
    client = KoalaClient("pk_test", api_url=collector.url, sync=sync, **FAST_RETRIES)
    with client.tracker(profile_id=str(uuid.uuid4())) as tracker:  # warm up: thread, session, imports
        tracker.track("Warm-up")
    assert client.flush(5)
    collector.answer_bytes(256 * 1024 * 1024)
    gc.collect()
    before = rss()
    for n in range(3):
        with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
            tracker.track("Huge answer", {"n": n})
    assert client.flush(10)
    grown = rss() - before
    client.shutdown(1)
    assert client.stats.delivered == 4 and client.stats.retried == 0
    assert grown < 20 * 1024 * 1024, f"memory grew by {grown / 1e6:.0f} MB"
