"""The sender's parts: backoff, Retry-After, verdicts, counters, bounds, flush, lazy start.

Fault scenarios end to end (outages, hangs, shutdown) are in ``test_faults.py``.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
import uuid

import httpx
import pytest

from helpers import FAST_RETRIES, delivery_settings
from koala_middleware import Batch, DeliveryError, KoalaClient
from koala_middleware._delivery import BackgroundSender
from koala_middleware._delivery._policy import (
    DEGRADED,
    DOWN,
    HEALTHY,
    PROBE_EVERY_MAX,
    Answer,
    Health,
    backoff,
    classify,
    parse_retry_after,
)
from koala_middleware._delivery._request import Request
from koala_middleware._delivery._sender import Sender
from koala_middleware._delivery._stats import LOG_DROPPED, LOG_DROPPED_SUMMARY, Counters
from koala_middleware.testing import Collector

SETTINGS = delivery_settings(backoff_base=0.5, max_backoff=30.0)


def track(client: KoalaClient, n: int = 0, event: str = "Tested") -> str:
    with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
        return tracker.track(event, {"n": n})


# -- backoff ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("failures", "low", "high"), [(1, 0.25, 0.5), (2, 0.5, 1.0), (4, 2.0, 4.0), (7, 15.0, 30.0)])
def test_backoff_doubles_with_jitter(failures: int, low: float, high: float) -> None:
    delays = {backoff(SETTINGS, failures) for _ in range(200)}
    assert all(low <= d <= high for d in delays)
    assert len(delays) > 100, "jitter: processes that lost Koala together must not retry in lockstep"


def test_backoff_is_capped_even_after_endless_failures() -> None:
    assert all(15.0 <= backoff(SETTINGS, failures) <= 30.0 for failures in (10, 100, 10**6))


def test_retry_after_is_a_floor_within_the_cap() -> None:
    assert all(10.0 <= backoff(SETTINGS, 1, retry_after=10) <= 30.0 for _ in range(50))
    assert backoff(SETTINGS, 1, retry_after=3600) == 30.0
    assert 0.25 <= backoff(SETTINGS, 1, retry_after=0) <= 0.5, "Retry-After: 0 must not make us spin"


# -- Retry-After --------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "seconds"), [("7", 7.0), (" 12 ", 12.0), ("0", 0.0), ("99999999999999999999", 1e9)])
def test_retry_after_in_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header) == seconds


def test_retry_after_as_an_http_date() -> None:
    ahead = parse_retry_after(email.utils.formatdate(time.time() + 60, usegmt=True))
    assert ahead is not None and 58 <= ahead <= 61
    assert parse_retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
    unknown_zone = email.utils.formatdate(time.time() + 60).replace("+0000", "-0000")
    assert 58 <= (parse_retry_after(unknown_zone) or 0) <= 61


@pytest.mark.parametrize("header", [None, "", "soon", "-1", "1.5", "nan", "inf", "²", "Mon, 99 Foo 2024 99:99:99 GMT"])
def test_unusable_retry_after_is_ignored(header: str | None) -> None:
    assert parse_retry_after(header) is None


# -- verdicts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_2xx_is_delivered(status: int) -> None:
    assert classify(Answer(status), None)[0] == "ok"


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_408_429_and_5xx_are_retried(status: int) -> None:
    verdict, detail, after = classify(Answer(status, "3"), None)
    assert (verdict, detail, after) == ("retry", f"HTTP {status}", 3.0)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_other_4xx_are_final_and_carry_the_response_text(status: int) -> None:
    verdict, detail, _ = classify(Answer(status, None, "profile_id is not a UUID"), None)
    assert (verdict, detail) == ("reject", "profile_id is not a UUID"), "the sender redacts and cuts it"


def test_network_errors_are_retried() -> None:
    verdict, detail, _ = classify(None, httpx.ConnectError("connection refused"))
    assert verdict == "retry" and "ConnectError" in detail and "refused" in detail


# -- Koala's health: this batch is bad, Koala degraded, Koala down ---------------------------------


def fail(
    health: Health, key: int, attempts: int = 1, probe: bool = False, unanswered: bool = False
) -> tuple[float, bool]:
    # Every earlier failure its own, as for a batch Koala refuses while it takes the others.
    verdict = health.failed(SETTINGS, key, attempts, probe, None, unanswered, own_failures=attempts - 1)
    return verdict.delay, verdict.own


def test_a_batch_failing_while_others_succeed_is_its_own_problem() -> None:
    health = Health(100)
    for _ in range(50):
        health.answered()
    delays = [fail(health, key=7, attempts=attempts) for attempts in range(1, 9)]
    assert health.state == HEALTHY and all(own for _, own in delays)
    assert 15.0 <= delays[-1][0] <= 30.0, "its own exponential backoff, up to max_backoff"
    assert health.admit(99, 100, time.monotonic()) == (True, None), "no one else waits"


def test_a_lone_batch_failing_with_an_answer_is_not_an_outage() -> None:
    health = Health(100)
    assert fail(health, key=7)[1] and fail(health, key=7, attempts=2)[1]
    assert health.state == HEALTHY


@pytest.mark.parametrize("unanswered", [False, True])
def test_failures_across_batches_with_no_success_is_down_and_probes_one_at_a_time(unanswered: bool) -> None:
    health = Health(100)
    fail(health, 1, attempts=5, unanswered=unanswered)
    for key in range(2, 11):  # a second batch failing, and no success: not batch 1's problem
        delay, own = fail(health, key, attempts=5, unanswered=unanswered)
        assert delay <= PROBE_EVERY_MAX and not own
    assert health.state == DOWN
    now = time.monotonic()
    assert health.admit(1, 100, now) == (False, None), "one attempt at a time"
    assert health.admit(0, 100, now + PROBE_EVERY_MAX) == (True, None), "a probe once the gate passed"
    for _ in range(20):  # failed probes: the pause grows, never past PROBE_EVERY_MAX
        fail(health, 1, probe=True)
    assert health.gate - time.monotonic() <= PROBE_EVERY_MAX
    assert health.answered() is True, "the first answer ends the outage"
    assert health.state == DEGRADED and health.admit(0, 100, time.monotonic())[0]


def test_a_connection_error_alone_is_evidence_of_an_outage() -> None:
    health = Health(100)
    fail(health, key=7, unanswered=True)
    assert health.state == DOWN


def test_a_half_failing_koala_is_degraded_and_paced_by_the_share_that_works() -> None:
    health = Health(100)
    for key in range(1, 51):
        health.answered()
        fail(health, key)
    assert health.state == DEGRADED and abs(health.share_ok() - 0.5) < 0.02
    now = time.monotonic()
    assert health.admit(50, 100, now) == (False, None), "half of max_in_flight in flight"
    started = sum(health.admit(0, 100, now + i * 0.0005)[0] for i in range(200))
    assert 120 <= started <= 160, f"{started} starts in 100 ms: a burst of 50, then 50 per 50 ms"
    delay, own = fail(health, 1, attempts=6)
    assert not own and delay <= 0.5, "not its fault: the first backoff step, attempts not counted"


def test_refused_batches_retried_are_no_evidence_of_a_brownout() -> None:
    """5% of batches refused: their retries must not add up to a brownout (which would slow
    everyone and keep them past max_retries)."""
    health = Health(100)
    suspects: dict[int, bool] = {}
    for n in range(2000):
        if n % 20 == 7:
            suspects[n] = health.failed(SETTINGS, n, 1, False, None, False).own
        else:
            health.answered()
        for key in list(suspects)[-30:]:  # the refused ones come back, again and again
            if n % 5 == 0:
                suspects[key] = health.failed(SETTINGS, key, 5, False, None, False, suspects[key]).own
        assert health.state == HEALTHY, f"at {n}: share {health.share_ok():.2f}"


def test_answers_after_a_brownout_make_koala_healthy_again() -> None:
    health = Health(100)
    for key in range(1, 51):
        fail(health, key)
    recovered = [health.answered() for _ in range(400)]
    # Down -> degraded (the scheduled retries are released), then degraded -> healthy.
    assert health.state == HEALTHY and recovered.count(True) == 2


def test_failures_while_koala_failed_for_everyone_do_not_lengthen_the_batchs_own_backoff() -> None:
    """A batch that waited out outages, then fails while the window still shows successes
    (the first failures of the next outage look like its own): its own backoff starts at
    the first step, and it is not given up (its attempts were Koala's failures, not its)."""
    sender = Sender(SETTINGS, None)
    batch = Batch("/batch", b"{}", "ua", ("m1",), 1)
    request = Request(batch, "http://127.0.0.1:9/batch", {})
    for key in range(1, 11):  # Koala down for everyone: ten batches fail
        sender._health.failed(SETTINGS, key, 1, False, None, True)
    for _ in range(SETTINGS.max_retries):
        delay = sender._outcome(request, None, ConnectionRefusedError("refused"), probe=True)
        assert delay is not None and delay <= PROBE_EVERY_MAX
    for _ in range(100):  # Koala is back for the others
        sender._health.answered()
    delay = sender._outcome(request, Answer(500), None, probe=False)
    assert sender._health.state == HEALTHY, "precondition: the window says this batch's own"
    assert delay is not None and delay <= SETTINGS.backoff_base, "its first own failure: the first step"
    assert sender.counters.snapshot(0).dropped == {}


# -- counters and rate-limited warnings -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_drop_warnings_are_rate_limited_per_reason_and_carry_counts(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    counters = Counters(clock)
    caplog.set_level(logging.WARNING, logger="koala_middleware")

    for _ in range(100):
        counters.dropped("queue_full", 1, 2, "the queue is at its bound")
    counters.dropped("retries_exhausted", 1, 1, "HTTP 503")
    first = [(r.msg, r.args) for r in caplog.records]
    assert [msg for msg, _ in first] == [LOG_DROPPED, LOG_DROPPED]
    assert first[0][1][:3] == (1, 2, "queue_full") and first[1][1][:3] == (1, 1, "retries_exhausted")

    caplog.clear()
    clock.now += counters.WARN_EVERY - 1
    counters.dropped("queue_full", 1, 2, "still full")
    assert caplog.records == [], "at most one warning per reason per interval"
    clock.now += 1
    counters.dropped("queue_full", 1, 2, "still full")
    [record] = caplog.records
    assert record.msg == LOG_DROPPED_SUMMARY
    assert record.args == (101, 202, "queue_full", counters.WARN_EVERY, "still full")

    caplog.clear()
    counters.dropped("queue_full", 1, 2, "at exit")
    counters.report()
    [record] = caplog.records
    assert record.msg == LOG_DROPPED_SUMMARY and record.args[:3] == (1, 2, "queue_full")
    counters.report()
    assert len(caplog.records) == 1, "nothing left to report"

    stats = counters.snapshot(queued=0)
    assert stats.dropped == {"queue_full": 103, "retries_exhausted": 1}
    assert stats.events_dropped == {"queue_full": 206, "retries_exhausted": 1}


def test_rejections_are_logged_as_errors(caplog: pytest.LogCaptureFixture) -> None:
    counters = Counters(Clock())
    counters.dropped("rejected", 1, 1, "HTTP 400, not retried: bad body")
    [record] = caplog.records
    assert record.levelno == logging.ERROR and "bad body" in record.getMessage()


# -- the background sender ------------------------------------------------------------------------


def test_the_sender_thread_starts_with_the_first_batch(collector: Collector) -> None:
    client = KoalaClient("pk_test", api_url=collector.url, **FAST_RETRIES)
    sender = client._sender
    assert isinstance(sender, BackgroundSender)
    assert sender._thread is None, "importing or configuring must not start threads (gunicorn --preload)"
    track(client)
    assert sender._thread is not None and sender._thread.name == "koala-sender"
    assert client.flush(10) and client.stats.delivered == 1
    client.shutdown(1)
    assert not sender._thread or not sender._thread.is_alive()


def test_batches_bound_counts_waiting_and_in_flight(collector: Collector) -> None:
    collector.hang()
    errors: list[DeliveryError] = []
    client = KoalaClient(
        "pk_test", api_url=collector.url, max_queue_batches=3, on_error=lambda b, e: errors.append(e), **FAST_RETRIES
    )
    for n in range(10):
        track(client, n)
    stats = client.stats
    assert (stats.enqueued, stats.queued, stats.dropped) == (3, 3, {"queue_full": 7})
    assert stats.events_dropped == {"queue_full": 7}
    assert [e.reason for e in errors] == ["queue_full"] * 7
    collector.release()
    assert client.flush(10)
    assert client.stats.delivered == 3 and len(collector.message_ids()) == 3
    client.shutdown(1)


def test_bytes_bound(collector: Collector) -> None:
    collector.hang()
    client = KoalaClient("pk_test", api_url=collector.url, max_queue_bytes=3000, **FAST_RETRIES)
    with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
        tracker.track("Big", {"blob": "x" * 4000})
    for n in range(20):
        track(client, n)
    stats = client.stats
    assert stats.dropped["queue_bytes_full"] >= 1 and stats.enqueued >= 1
    assert stats.enqueued + stats.dropped["queue_bytes_full"] == 21
    assert client._sender._queue.pending_bytes <= 3000
    collector.release()
    assert client.flush(10)
    assert client._sender._queue.pending_bytes == 0
    client.shutdown(1)


def test_flush_never_overshoots_its_timeout(collector: Collector) -> None:
    collector.hang()
    client = KoalaClient("pk_test", api_url=collector.url, timeout=30)
    track(client)
    for timeout in (0.0, 0.2, 0.5):
        started = time.monotonic()
        assert client.flush(timeout) is False
        assert time.monotonic() - started < timeout + 0.3
    client.shutdown(0.2)


def test_after_fork_the_sender_starts_over(collector: Collector) -> None:
    """``after_fork()`` as a forked child runs it (a real fork is in tests/e2e/test_fork.py).

    In a real child the parent's sender thread does not exist; here it still runs, so it is
    left idle first (a sender thread still posting would race the "child" for its queue:
    forking mid-flight is what the real fork test covers)."""
    client = KoalaClient("pk_test", api_url=collector.url, **FAST_RETRIES)
    track(client)
    assert client.flush(10)
    sender = client._sender
    parent_thread, parent_queue = sender._thread, sender._queue
    sender.after_fork()
    assert client.stats == type(client.stats)(), "the child's stats start empty"
    assert sender._thread is None and sender._queue is not parent_queue and sender.pending() == 0
    track(client, 1, "In Child")
    assert client.flush(10)
    assert client.stats.delivered == 1 and sender._thread is not parent_thread
    client.shutdown(1)


def test_an_on_error_hook_may_call_flush_without_deadlock(collector: Collector) -> None:
    collector.answer_with(400)
    flushed: list[bool] = []
    client = KoalaClient("pk_test", api_url=collector.url, **FAST_RETRIES)
    client._sender.on_error = lambda batch, error: flushed.append(client.flush(5))
    track(client)
    started = time.monotonic()
    assert client.flush(10)
    assert flushed == [False] and time.monotonic() - started < 3
    client.shutdown(1)


def test_submits_from_many_threads_are_all_accounted(client: KoalaClient, collector: Collector) -> None:
    def burst(offset: int) -> None:
        for n in range(50):
            track(client, offset + n)

    threads = [threading.Thread(target=burst, args=(k * 50,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert client.flush(20)
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 400 == client.stats.events_delivered
    assert sorted(e["properties"]["n"] for e in collector.events()) == list(range(400))


@pytest.mark.parametrize("sync", [False, True], ids=["background", "sync"])
def test_transport_is_refused_saying_what_to_use_instead(sync: bool) -> None:
    """An httpx transport used to replace the engine (and silently did nothing in the other
    mode); tests use a real local Koala instead."""
    with pytest.raises(TypeError, match=r"transport=.*Collector.*api_url=collector\.url"):
        KoalaClient("pk_mock", sync=sync, transport=httpx.MockTransport(lambda request: httpx.Response(200)))  # type: ignore[arg-type]


def test_default_max_in_flight_is_100_since_50_caps_at_1000_per_second_at_50_ms() -> None:
    assert delivery_settings().max_in_flight == 100
