"""Delivery under faults, injected into the real local collector: outages, error storms,
hangs, rejections, full queues, shutdown. The host must never notice; no event may vanish
without being counted.

The last tests run the fault apps under real servers (uvicorn, gunicorn) to show that the
request side stays fast whatever Koala does.
"""

from __future__ import annotations

import email.utils
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from e2e.servers import Server, fault_server, wait_until
from helpers import FAST_RETRIES
from koala_middleware import Batch, DeliveryError, KoalaClient
from koala_middleware._delivery._sender import LOG_HOOK_FAILED, LOG_UNAVAILABLE
from koala_middleware._delivery._worker import LOG_SHUTDOWN_LOST
from koala_middleware.testing import Collector, Received

#: Every engine passes the same tests (conftest.py's ``engine``).
pytestmark = pytest.mark.usefixtures("engine")


class Errors(list[tuple[Batch, DeliveryError]]):
    """An ``on_error`` hook that remembers what it was given."""

    def __call__(self, batch: Batch, error: DeliveryError) -> None:
        self.append((batch, error))

    @property
    def reasons(self) -> list[str]:
        return [error.reason for _, error in self]

    @property
    def message_ids(self) -> list[str]:
        return [i for batch, _ in self for i in batch.message_ids]


def track(client: KoalaClient, n: int = 0) -> str:
    with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
        return tracker.track("Fault Tested", {"n": n})


def make(collector: Collector, **options: Any) -> tuple[KoalaClient, Errors]:
    errors = Errors()
    return KoalaClient("pk_test", api_url=collector.url, on_error=errors, **{**FAST_RETRIES, **options}), errors


@pytest.fixture
def faulty(collector: Collector) -> Iterator[tuple[KoalaClient, Errors]]:
    client, errors = make(collector)
    yield client, errors
    client.shutdown(1)


# -- outages ------------------------------------------------------------------------------------


def test_koala_down_for_a_while_then_back_delivers_every_batch_once(collector: Collector) -> None:
    client, errors = make(collector, max_in_flight=10)
    sent = [track(client, n) for n in range(20)]
    assert client.flush(10)
    collector.down()
    started = time.monotonic()
    sent += [track(client, n) for n in range(20, 220)]
    assert time.monotonic() - started < 1.0, "handing over must not wait for a dead Koala"
    # The 10 in flight fail together; then the sender probes, one batch per pause.
    assert wait_until(lambda: client.stats.retried >= 15), "the sender should be probing"
    collector.up()
    assert client.flush(10), "the queue must drain once Koala is back"
    ids = collector.message_ids()
    assert sorted(ids) == sorted(sent), "every batch accepted during the outage arrives, none twice"
    stats = client.stats
    assert (stats.delivered, stats.dropped, errors) == (220, {}, [])
    assert stats.retried < 40, f"{stats.retried} retries: the sender kept hammering a dead Koala"
    client.shutdown(1)


def test_an_error_storm_is_probed_one_request_at_a_time(collector: Collector, caplog: pytest.LogCaptureFixture) -> None:
    client, errors = make(collector, max_in_flight=10)
    collector.answer_with(503)
    sent = [track(client, n) for n in range(200)]
    time.sleep(1.0)  # the window in which a spinning sender would post hundreds of times
    failed = len(collector.requests(accepted_only=False))
    # The first 10 were in flight together; then pauses grow 0.02 -> 0.2 s: about a dozen
    # probes in a second. Sending the queue at each retry would be hundreds.
    assert failed < 40, f"{failed} requests in 1 s of outage: the sender spins"
    assert [r.msg for r in caplog.records].count(LOG_UNAVAILABLE) == 1, "one warning per outage"
    collector.answer_with(200)
    assert client.flush(10)
    assert sorted(collector.message_ids()) == sorted(sent)
    assert client.stats.delivered == 200 and not errors
    client.shutdown(1)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses_are_retried_with_the_same_message_ids(
    status: int, collector: Collector, faulty: tuple[KoalaClient, Errors]
) -> None:
    client, errors = faulty
    collector.fail_next(2, status)
    message_id = track(client)
    assert client.flush(10)
    attempts = collector.requests(accepted_only=False)
    assert [r.status for r in attempts] == [status, status, 200]
    assert len({r.body for r in attempts}) == 1, "a retry posts the same bytes, hence the same message_id"
    assert collector.message_ids() == [message_id]
    assert (client.stats.delivered, client.stats.retried, errors) == (1, 2, [])


def test_a_timeout_is_retried_and_koala_can_deduplicate(collector: Collector) -> None:
    client, errors = make(collector, timeout=0.3)
    collector.hang()
    message_id = track(client)
    assert collector.wait_for(2, accepted_only=False), "the timed-out attempt is retried"
    collector.release()  # the held requests are answered now, late
    assert client.flush(10)
    ids = collector.message_ids(accepted_only=False)  # the timed-out attempt was received too
    assert set(ids) == {message_id} and len(ids) >= 2, "Koala sees the same message_id twice: it dedupes"
    assert client.stats.delivered == 1 and client.stats.retried >= 1 and not errors
    client.shutdown(1)


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422])
def test_other_4xx_are_not_retried_and_are_logged_with_the_response_text(
    status: int, collector: Collector, faulty: tuple[KoalaClient, Errors], caplog: pytest.LogCaptureFixture
) -> None:
    client, errors = faulty
    collector.fail_next(1, status)
    message_id = track(client)
    assert client.flush(10)
    assert [r.status for r in collector.requests(accepted_only=False)] == [status]
    stats = client.stats
    assert (stats.dropped, stats.events_dropped, stats.retried) == ({"rejected": 1}, {"rejected": 1}, 0)
    assert errors.reasons == ["rejected"] and errors[0][1].status == status
    assert errors.message_ids == [message_id]
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert f"HTTP {status}" in record.getMessage() and "stand-in failure" in record.getMessage()
    track(client, 1)
    assert client.flush(10) and client.stats.delivered == 1, "a rejection does not slow the sender down"


def test_retry_after_is_honoured(collector: Collector) -> None:
    client, _ = make(collector, backoff_base=0.01, max_backoff=5)
    collector.fail_next(1, 429, {"Retry-After": "1"})
    track(client)
    assert client.flush(10)
    first, second = collector.requests(accepted_only=False)
    assert second.at - first.at >= 0.9
    client.shutdown(1)


def test_retry_after_as_a_date_is_honoured(collector: Collector) -> None:
    client, _ = make(collector, backoff_base=0.01, max_backoff=5)
    answers = iter([503])

    def respond(received: Received) -> tuple[int, dict[str, str]]:
        # Dated when answered, in whole seconds: 1 to 2 s ahead.
        return next(answers, 200), {"Retry-After": email.utils.formatdate(time.time() + 2, usegmt=True)}

    collector.answer_with(respond)
    track(client)
    assert client.flush(10)
    first, second = collector.requests(accepted_only=False)
    assert second.status == 200 and second.at - first.at >= 0.9
    client.shutdown(1)


def test_retry_after_is_capped_by_max_backoff(collector: Collector) -> None:
    client, _ = make(collector, max_backoff=0.3)
    collector.fail_next(1, 503, {"Retry-After": "3600"})
    track(client)
    assert client.flush(5), "an hour-long Retry-After must be capped"
    assert client.stats.delivered == 1
    client.shutdown(1)


def test_a_batch_that_keeps_failing_is_given_up_once(collector: Collector) -> None:
    client, errors = make(collector, max_retries=3)
    collector.answer_with(500)
    message_id = track(client)
    assert client.flush(10), "given up after a bounded time"
    assert len(collector.requests(accepted_only=False)) == 4, "1 attempt + max_retries"
    stats = client.stats
    assert (stats.dropped, stats.events_dropped, stats.retried) == (
        {"retries_exhausted": 1},
        {"retries_exhausted": 1},
        3,
    )
    assert errors.reasons == ["retries_exhausted"] and errors.message_ids == [message_id]
    assert errors[0][1].status == 500
    collector.answer_with(200)
    track(client, 1)
    assert client.flush(10) and client.stats.delivered == 1
    client.shutdown(1)


def test_a_batch_koala_keeps_refusing_does_not_stall_the_others(collector: Collector) -> None:
    client, _ = make(collector, max_retries=4)
    collector.answer_with(lambda received: 500 if b'"poison"' in received.body else 200)
    with client.tracker(email="poison@example.com") as tracker:
        tracker.track("Poison", {"poison": True})
    sent = [track(client, n) for n in range(100)]
    assert client.flush(10)
    assert sorted(collector.message_ids()) == sorted(sent)
    assert client.stats.dropped == {"retries_exhausted": 1} and client.stats.delivered == 100
    client.shutdown(1)


def test_an_on_error_hook_that_raises_never_kills_the_sender(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    def hook(batch: Batch, error: DeliveryError) -> None:
        raise RuntimeError("the user's monitoring is down too")

    client = KoalaClient("pk_test", api_url=collector.url, on_error=hook, **FAST_RETRIES)
    collector.fail_next(1, 400)
    track(client)
    assert client.flush(10)
    assert LOG_HOOK_FAILED in [r.msg for r in caplog.records]
    track(client, 1)
    assert client.flush(10) and client.stats.delivered == 1
    client.shutdown(1)


# -- a Koala that never answers, and shutdown -----------------------------------------------------------


def test_a_full_queue_drops_new_batches_counted_and_never_blocks(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    collector.hang()
    client, errors = make(collector, max_queue_batches=10, timeout=30)
    started = time.monotonic()
    sent = [track(client, n) for n in range(500)]
    assert time.monotonic() - started < 1.0, "a full queue must never block the hand-over"
    stats = client.stats
    assert (stats.enqueued, stats.queued, stats.dropped) == (10, 10, {"queue_full": 490})
    assert errors.reasons == ["queue_full"] * 490 and errors.message_ids == sent[10:]
    drop_logs = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(drop_logs) == 1, "drop warnings are rate limited"
    collector.release()
    assert client.flush(10)
    assert sorted(collector.message_ids()) == sorted(sent[:10])
    client.shutdown(1)


def test_shutdown_with_a_hanging_koala_returns_in_time_and_counts_each_batch_once(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    collector.hang()
    client, errors = make(collector, timeout=30, max_in_flight=20)
    sent = [track(client, n) for n in range(60)]  # 20 in flight, 40 waiting
    assert collector.wait_for(20, accepted_only=False), "the first 20 are in flight"
    started = time.monotonic()
    assert client.shutdown(timeout=1.0) is False
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, f"shutdown(1.0) took {elapsed:.2f}s"
    stats = client.stats
    assert (stats.dropped, stats.events_dropped, stats.queued, stats.delivered) == (
        {"shutdown": 60},
        {"shutdown": 60},
        0,
        0,
    )
    assert sorted(errors.message_ids) == sorted(sent), "in flight or queued: each counted once"
    assert LOG_SHUTDOWN_LOST in [r.msg for r in caplog.records]
    # After shutdown, batches are refused and counted, and no thread starts again.
    track(client, 60)
    assert client.stats.dropped == {"shutdown": 61} and not client._sender._thread


def test_shutdown_while_koala_fails_counts_the_waiting_retries(collector: Collector) -> None:
    client, errors = make(collector, backoff_base=1, max_backoff=5)
    collector.answer_with(503)
    sent = [track(client, n) for n in range(30)]
    assert collector.wait_for(1, accepted_only=False)
    assert client.shutdown(timeout=0.5) is False
    assert client.stats.dropped == {"shutdown": 30} and client.stats.queued == 0
    assert sorted(errors.message_ids) == sorted(sent)


def test_shutdown_delivers_what_is_pending_when_koala_is_slow(collector: Collector) -> None:
    collector.slow(0.5)
    client, errors = make(collector)
    sent = [track(client, n) for n in range(100)]
    assert client.shutdown(timeout=5)
    assert sorted(collector.message_ids()) == sorted(sent) and not errors


# -- sync mode ------------------------------------------------------------------------------------


def test_sync_mode_delivers_before_returning(collector: Collector) -> None:
    client, errors = make(collector, sync=True)
    collector.fail_next(2, 503)
    message_id = track(client)
    assert collector.message_ids() == [message_id], "sent, with its retries, before the hand-over returned"
    assert (client.stats.delivered, client.stats.retried, errors) == (1, 2, [])


@pytest.mark.parametrize("fault", ["hang", "down", "500"])
def test_sync_mode_is_bounded_and_never_raises(fault: str, collector: Collector) -> None:
    client, errors = make(collector, sync=True, timeout=0.5, backoff_base=0.05, max_backoff=1)
    if fault == "hang":
        collector.hang()
    elif fault == "down":
        collector.down()
    else:
        collector.answer_with(500)
    started = time.monotonic()
    message_id = track(client)  # must not raise
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, f"a sync hand-over took {elapsed:.2f}s with timeout=0.5"
    assert client.stats.dropped == {"retries_exhausted": 1}
    assert errors.reasons == ["retries_exhausted"] and errors.message_ids == [message_id]
    client.shutdown()


def test_sync_mode_stops_retrying_while_koala_stays_down(collector: Collector) -> None:
    """The shared backoff outgrows the per-batch budget: then one attempt per batch."""
    client, _ = make(collector, sync=True, timeout=1, backoff_base=0.2, max_backoff=5)
    collector.answer_with(503)
    for n in range(3):
        track(client, n)
    before = len(collector.requests(accepted_only=False))
    for n in range(3, 6):
        track(client, n)
    assert len(collector.requests(accepted_only=False)) - before == 3
    assert client.stats.dropped == {"retries_exhausted": 6}
    collector.answer_with(200)
    track(client, 6)
    assert client.stats.delivered == 1, "the first answer resets the backoff"


# -- through real servers ------------------------------------------------------------------------


def timed_requests(server: Server, count: int) -> list[float]:
    took = []
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for n in range(count):
            started = time.monotonic()
            assert http.get("/track", params={"n": n}).status_code == 200
            took.append(time.monotonic() - started)
    return took


def test_a_full_queue_under_uvicorn_drops_counted_and_the_app_still_answers(collector: Collector) -> None:
    collector.hang()
    with fault_server("uvicorn", collector, max_queue_batches=5, timeout=30, shutdown_timeout=0.3) as server:
        took = timed_requests(server, 40)
        stats = httpx.get(server.url + "/stats", timeout=10).json()
    assert max(took) < 1.0, f"slowest response {max(took):.2f}s while Koala hangs"
    assert (stats["enqueued"], stats["queued"], stats["dropped"]) == (5, 5, {"queue_full": 35})


def test_a_slow_koala_does_not_slow_gunicorn_responses(collector: Collector) -> None:
    collector.slow(2.0)
    with fault_server("gunicorn", collector, shutdown_timeout=5) as server:
        took = timed_requests(server, 10)
        assert max(took) < 1.0, f"slowest response {max(took):.2f}s with a 2 s Koala"
        assert collector.wait_for(10, timeout=15)
    assert sorted(e["properties"]["n"] for e in collector.events()) == list(range(10))
