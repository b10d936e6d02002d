"""The failure policy against a Koala that half-works (issue 19), in short versions.

Each scenario runs the real client against the real local collector with the DEFAULT retry
options (``backoff_base=0.5``, ``max_backoff=30``): tiny backoffs would hide a sender-wide
pause. The long versions (minutes, at 100-200 batches/s) are bench part 8 ("failures").
The flapping tests (about 10 s each) are marked ``e2e``.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from e2e.servers import wait_until
from koala_middleware import Batch, DeliveryError, KoalaClient
from koala_middleware._delivery._sender import LOG_HOOK_FAILED
from koala_middleware.testing import Collector, Received


class Errors(list[tuple[Batch, DeliveryError]]):
    def __call__(self, batch: Batch, error: DeliveryError) -> None:
        self.append((batch, error))


def make(collector: Collector, **options: Any) -> tuple[KoalaClient, Errors]:
    errors = Errors()
    return KoalaClient("pk_test", api_url=collector.url, on_error=errors, timeout=2.0, **options), errors


def track(client: KoalaClient, refused: bool = False) -> str:
    with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
        return tracker.track("Refused" if refused else "Healthy")


def refuse_marked(received: Received) -> int:
    return 500 if b'"Refused"' in received.body else 200


def drive(
    client: KoalaClient, rate: float, seconds: float, refused: Callable[[int], bool] = lambda n: False
) -> list[str]:
    """Track ``rate`` batches a second for ``seconds``; the healthy batches' message ids."""
    healthy = []
    start = time.monotonic()
    n = 0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate) + 1
        while n < due:
            if refused(n):
                track(client, refused=True)
            else:
                healthy.append(track(client))
            n += 1
        time.sleep(0.01)
    return healthy


@pytest.fixture
def shutdowns() -> Iterator[list[KoalaClient]]:
    clients: list[KoalaClient] = []
    yield clients
    for client in clients:
        client.shutdown(0.5)


# -- 1: batches Koala always refuses stall no one ------------------------------------------


def test_refused_batches_ahead_of_healthy_ones_hold_no_one(collector: Collector, shutdowns: list[KoalaClient]) -> None:
    client, _ = make(collector)
    shutdowns.append(client)
    collector.answer_with(refuse_marked)
    for _ in range(8):
        track(client, refused=True)
    assert wait_until(lambda: len(collector.requests(accepted_only=False)) >= 8, 5)
    started = time.monotonic()
    healthy = [track(client) for _ in range(300)]
    assert wait_until(lambda: len(collector.requests()) >= 300, 5)
    took = time.monotonic() - started
    assert sorted(collector.message_ids()) == sorted(healthy)
    assert took <= 2.0, f"healthy batches took {took:.1f}s behind 8 refused ones"
    assert client.stats.dropped == {}, "the refused ones are still being retried, on their own schedule"


def test_a_share_of_refused_batches_costs_the_healthy_ones_nothing(
    collector: Collector, shutdowns: list[KoalaClient]
) -> None:
    client, _ = make(collector)
    shutdowns.append(client)
    collector.answer_with(refuse_marked)
    healthy = drive(client, rate=100, seconds=4, refused=lambda n: n % 20 == 7)  # 5%
    assert wait_until(lambda: len(collector.requests()) >= len(healthy), 1.0), (
        f"{len(collector.requests())} of {len(healthy)} healthy batches arrived within 1 s of the end"
    )
    assert not client.stats.dropped


# -- 2, 3: a Koala that fails for everyone, wholly or half ------------------------------------


def test_a_half_failing_koala_delivers_everything_without_giving_up(
    collector: Collector, shutdowns: list[KoalaClient]
) -> None:
    """503 to a random half of all requests: the half that works carries everything."""
    client, errors = make(collector, max_retries=3)
    shutdowns.append(client)
    coin = random.Random(19)
    lock = threading.Lock()

    def half(received: Received) -> int:
        with lock:
            return 503 if coin.random() < 0.5 else 200

    collector.answer_with(half)
    sent = drive(client, rate=100, seconds=5)
    arrived = set(collector.message_ids())
    collector.answer_with(200)
    assert client.flush(3), "everything delivered within 3 s of the brownout's end"
    # The last second's batches may still be between attempts: 90% of those before it.
    settled = sent[: len(sent) * 4 // 5]
    delivered = sum(message_id in arrived for message_id in settled)
    assert delivered >= 0.9 * len(settled), f"{delivered} of {len(settled)} delivered during the brownout"
    assert sorted(collector.message_ids()) == sorted(sent)
    assert (client.stats.dropped, errors) == ({}, []), "max_retries=3 is spent in a brownout, retry_for is not"


@pytest.mark.e2e  # about 10 s each
@pytest.mark.parametrize("outage", ["refused", "503"])
def test_a_flapping_koala_never_leaves_a_long_gap(
    outage: str, collector: Collector, shutdowns: list[KoalaClient]
) -> None:
    """Down 3 s, up 1.5 s: deliveries resume within a probe interval (1.5 s) of each return."""
    client, _ = make(collector)
    shutdowns.append(client)
    stop = threading.Event()

    def flap() -> None:
        while not stop.wait(1.5):
            collector.down() if outage == "refused" else collector.answer_with(503)
            if stop.wait(3.0):
                break
            collector.up() if outage == "refused" else collector.answer_with(200)

    flapper = threading.Thread(target=flap)
    flapper.start()
    try:
        sent = drive(client, rate=100, seconds=9)
    finally:
        stop.set()
        flapper.join()
        collector.up() if outage == "refused" and not _listening(collector) else None
        collector.answer_with(200)
    assert client.flush(5)
    arrivals = sorted({r.at for r in collector.requests()})
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert max(gaps) <= 5.3, f"a {max(gaps):.1f}s gap in deliveries while Koala was down for 3 s at a time"
    assert sorted(collector.message_ids()) == sorted(sent)
    assert client.stats.dropped == {}


def _listening(collector: Collector) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", collector.port)) == 0


def test_after_an_outage_the_queue_drains_within_a_probe_interval(
    collector: Collector, shutdowns: list[KoalaClient]
) -> None:
    client, _ = make(collector)
    shutdowns.append(client)
    track(client)
    assert client.flush(5)
    collector.down()
    sent = drive(client, rate=100, seconds=6)
    collector.up()
    back = time.monotonic()
    assert client.flush(10)
    took = time.monotonic() - back
    assert took <= 3.0, f"{len(sent)} queued batches took {took:.1f}s to arrive after Koala came back"
    assert client.stats.dropped == {}


# -- the retry budget in time ------------------------------------------------------------


def test_a_brownout_longer_than_max_retries_drops_nothing_within_retry_for(
    collector: Collector, shutdowns: list[KoalaClient]
) -> None:
    client, errors = make(collector, max_retries=1, backoff_base=0.02)
    shutdowns.append(client)
    collector.answer_with(503)
    sent = [track(client) for _ in range(20)]
    # 20 first failures, then probes: each failed probe is a batch past max_retries=1.
    assert wait_until(lambda: client.stats.retried >= 25, 8), "retrying meanwhile"
    collector.answer_with(200)
    assert client.flush(5)
    assert (client.stats.dropped, errors) == ({}, [])
    assert sorted(collector.message_ids()) == sorted(sent)


def test_retry_for_zero_gives_up_after_max_retries_as_before(
    collector: Collector, shutdowns: list[KoalaClient]
) -> None:
    client, _ = make(collector, max_retries=2, backoff_base=0.02, retry_for=0)
    shutdowns.append(client)
    collector.answer_with(503)
    track(client)
    assert client.flush(5)
    assert client.stats.dropped == {"retries_exhausted": 1}
    assert len(collector.requests(accepted_only=False)) == 3


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), (float("nan"), TypeError), ("60", TypeError), (True, TypeError)]
)
def test_retry_for_is_checked_at_construction(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="retry_for"):
        KoalaClient("pk_test", api_url="http://127.0.0.1:9", retry_for=value)  # type: ignore[arg-type]


# -- 4: hooks cannot wedge the sender ------------------------------------------------------


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt, GeneratorExit])
@pytest.mark.parametrize("sync", [False, True])
def test_an_on_error_hook_raising_a_base_exception_is_contained(
    raised: type[BaseException], sync: bool, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    def hook(batch: Batch, error: DeliveryError) -> None:
        raise raised()

    client = KoalaClient("pk_test", api_url=collector.url, on_error=hook, sync=sync)
    collector.fail_next(1, 400)
    track(client)
    assert client.flush(2), "the rejected batch is finished, not pending forever"
    track(client)
    assert client.flush(2) and client.stats.delivered == 1
    assert client.stats.dropped == {"rejected": 1}
    assert LOG_HOOK_FAILED in [r.msg for r in caplog.records]
    client.shutdown(1)
