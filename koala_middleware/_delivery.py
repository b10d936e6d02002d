"""Getting batches to Koala without ever making the host app wait.

Handing a batch over is an append to a bounded in-memory queue. One daemon thread, started
on the first batch, runs an asyncio loop that posts batches concurrently over pooled,
kept-alive httpx connections, spread over several small pools (one httpx pool slows down as
its connection count grows).

Failures follow the docs' advice: network errors, timeouts, 408, 429 and 5xx are retried,
other 4xx are final. A retry posts the batch's same bytes, hence its ``message_id``\\s, so
Koala deduplicates. When an attempt fails, the whole sender stops sending and waits out a
capped exponential backoff with jitter (at least ``Retry-After``, within the cap); then one
batch at a time goes out as a probe until one gets an answer. So an outage costs one request
per backoff period, not one per queued batch, the queue keeps filling up to its bounds
meanwhile, and the first answer reopens full concurrency. Failed batches go to the back of
the queue, so a batch Koala keeps refusing cannot stall the others; it is given up after
``max_retries`` failed attempts.

Everything that does not arrive is counted once, by reason, in :class:`Stats`, logged (at
most once per reason every ``WARN_EVERY`` seconds) and passed to the ``on_error`` hook.

After ``os.fork()`` the child starts with a fresh queue, locks, counters, thread and pools:
the parent's are not usable there (gunicorn ``--preload``, uWSGI, Celery prefork), and the
parent still delivers what it had queued. During the fork itself the parent's sender thread
is parked in its ``select()``: a thread copied mid-step could hold a lock the child then
waits on forever, such as an import lock (httpx imports lazily, on first use).
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import email.utils
import logging
import os
import random
import selectors
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from . import _native
from ._protocol import Batch

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

logger = logging.getLogger("koala_middleware")

LOG_DROPPED = (
    "dropped %d batch(es), %d event(s) (%s): %s; "
    "repeats are summarised every %.0fs, counts are in client.stats"
)
LOG_DROPPED_SUMMARY = "dropped %d more batch(es), %d event(s) (%s) in the last %.1fs; last: %s"
LOG_REJECTED = "HTTP %d, not retried: %s"
LOG_RETRY = "delivery failed (%s), attempt %d, next try in %.2fs"
LOG_UNAVAILABLE = (
    "Koala is failing (%s); pausing delivery for %.2fs, then probing one batch "
    "at a time (new batches queue up meanwhile, within the bounds)"
)
LOG_RECOVERED = "Koala answers again after %d failed attempt(s); resuming delivery"
LOG_HOOK_FAILED = "the on_error hook raised; ignoring it"
LOG_SHUTDOWN_LOST = "shutdown timed out with %d batch(es) undelivered"
LOG_SENDER_FAILED = "the sender thread failed; it restarts with the next batch"
LOG_UNEXPECTED = "unexpected error after posting a batch; counted as dropped ('error')"

ErrorHook = Callable[[Batch, "DeliveryError"], None]


class DeliveryError(Exception):
    """Why a batch was given up; passed to the ``on_error`` hook, never raised at callers.

    ``reason`` is the key it is counted under in ``client.stats.dropped``: ``queue_full``,
    ``queue_bytes_full``, ``rejected`` (a 4xx), ``retries_exhausted``, ``shutdown`` or
    ``error`` (something unexpected; the detail says what).
    """

    def __init__(self, reason: str, detail: str = "", status: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.status = status


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How the sender talks to Koala; the ``KoalaClient`` options of the same names."""

    base_url: str
    timeout: float = 5.0
    max_queue_batches: int = 10_000
    max_queue_bytes: int = 32 * 1024 * 1024
    max_in_flight: int = 100
    connections_per_pool: int = 5
    max_retries: int = 8
    backoff_base: float = 0.5
    max_backoff: float = 30.0
    transport: httpx.AsyncBaseTransport | httpx.BaseTransport | None = None


@dataclass
class Stats:
    """Counters since the client started (or since fork, in a child process).

    Batches are what the sender posts (one person or account, up to 30 items of each type).
    ``enqueued`` counts batches accepted for delivery; each then ends up ``delivered`` or in
    ``dropped`` (by reason), or is still ``queued`` (waiting, in flight or between retries).
    Batches refused at hand-over (``queue_full``, ``queue_bytes_full``, ``shutdown``) are
    in ``dropped`` only.
    """

    enqueued: int = 0
    delivered: int = 0
    retried: int = 0
    dry_run: int = 0
    events_delivered: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    events_dropped: dict[str, int] = field(default_factory=dict)
    queued: int = 0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class _Unlogged:
    """Drops of one reason not yet logged, and when that reason was last logged."""

    __slots__ = ("batches", "detail", "events", "logged_at")

    def __init__(self) -> None:
        self.batches = 0
        self.events = 0
        self.detail = ""
        self.logged_at: float | None = None


class _Counters:
    """Thread-safe counters behind :class:`Stats`, with rate-limited drop warnings.

    The first drop of a reason is logged at once, with its detail; later ones are added up
    and logged at most once every ``WARN_EVERY`` seconds per reason (and at shutdown), so a
    Koala outage cannot flood the host app's logs.
    """

    WARN_EVERY = 10.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = _native.Lock()
        self._stats = Stats()
        self._clock = clock
        self._unlogged: dict[str, _Unlogged] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + n)

    def enqueued_locked(self) -> None:
        """Count a hand-over without taking this lock: the caller holds the lock that
        orders every hand-over to its sender (the queue's), so increments cannot race."""
        self._stats.enqueued += 1

    def delivered(self, batch: Batch) -> None:
        with self._lock:
            self._stats.delivered += 1
            self._stats.events_delivered += len(batch.message_ids)

    def dropped(self, reason: str, batches: int, events: int, detail: str = "") -> None:
        with self._lock:
            stats = self._stats
            if batches:
                stats.dropped[reason] = stats.dropped.get(reason, 0) + batches
            if events:
                stats.events_dropped[reason] = stats.events_dropped.get(reason, 0) + events
            unlogged = self._unlogged.setdefault(reason, _Unlogged())
            unlogged.batches += batches
            unlogged.events += events
            unlogged.detail = detail or unlogged.detail
            now = self._clock()
            if unlogged.logged_at is not None and now - unlogged.logged_at < self.WARN_EVERY:
                return
            line = self._take(reason, unlogged, now)
        _log(*line)

    def report(self) -> None:
        """Log the drops not logged yet (at shutdown, so no count goes unsaid)."""
        with self._lock:
            now = self._clock()
            lines = [
                self._take(reason, unlogged, now)
                for reason, unlogged in self._unlogged.items()
                if unlogged.batches or unlogged.events
            ]
        for line in lines:
            _log(*line)

    def _take(self, reason: str, unlogged: _Unlogged, now: float) -> tuple[str, str, tuple[object, ...]]:
        if unlogged.logged_at is None:
            args: tuple[object, ...] = (unlogged.batches, unlogged.events, reason, unlogged.detail, self.WARN_EVERY)
            line = reason, LOG_DROPPED, args
        else:
            args = (unlogged.batches, unlogged.events, reason, now - unlogged.logged_at, unlogged.detail)
            line = reason, LOG_DROPPED_SUMMARY, args
        unlogged.batches = unlogged.events = 0
        unlogged.logged_at = now
        return line

    def snapshot(self, queued: int) -> Stats:
        with self._lock:
            s = self._stats
            return Stats(
                s.enqueued, s.delivered, s.retried, s.dry_run, s.events_delivered,
                dict(s.dropped), dict(s.events_dropped), queued,
            )


def _log(reason: str, message: str, args: tuple[object, ...]) -> None:
    # A 4xx means a bug or a wrong key: the host's developers must see it.
    logger.log(logging.ERROR if reason == "rejected" else logging.WARNING, message, *args)


def backoff(settings: DeliverySettings, failures: int, retry_after: float | None = None) -> float:
    """The pause after ``failures`` failures in a row: capped exponential, with jitter.

    Half the step is fixed and half random, so many processes that lost Koala together do
    not come back in lockstep. ``Retry-After`` is a floor; ``max_backoff`` caps everything.
    """
    step = settings.backoff_base * 2.0 ** min(max(failures - 1, 0), 60)
    ceiling = min(settings.max_backoff, step)
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return max(0.0, min(delay, settings.max_backoff))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date), or None.

    A date in the past is 0; anything unparsable is None (the normal backoff applies).
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(min(int(value), 10**9))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # Python < 3.10.? returned None for some bad dates
        return None
    if when.tzinfo is None:  # "-0000": RFC 5322's "UTC, origin unknown"
        when = when.replace(tzinfo=datetime.timezone.utc)
    try:
        return max(when.timestamp() - time.time(), 0.0)
    except (OverflowError, OSError, ValueError):
        return None


def classify(response: httpx.Response | None, exc: BaseException | None) -> tuple[str, str, float | None]:
    """``("ok"|"retry"|"reject", detail, retry_after)`` for one attempt's outcome."""
    if exc is not None:
        text = str(exc)
        return "retry", f"{type(exc).__name__}: {text}" if text else type(exc).__name__, None
    assert response is not None
    status = response.status_code
    if 200 <= status < 300:
        return "ok", "", None
    if status in (408, 429) or status >= 500:
        return "retry", f"HTTP {status}", parse_retry_after(response.headers.get("retry-after"))
    try:
        text = response.text[:500]
    except Exception:  # undecodable body: the status says enough
        text = ""
    return "reject", LOG_REJECTED % (status, text), None


class _Health:
    """Koala as the sender sees it: failures in a row, and no new attempt before ``gate``.

    Only a probe's failure (or the first failure) raises the level: the batches that were
    already in flight when Koala went away all fail at once, and that is one failure.
    """

    __slots__ = ("_lock", "failures", "gate")

    def __init__(self) -> None:
        self.failures = 0
        self.gate = 0.0
        self._lock = _native.Lock()

    def failed(self, settings: DeliverySettings, probe: bool, retry_after: float | None) -> tuple[float, bool]:
        """Record a failure; (seconds until the next attempt, whether it is the first)."""
        with self._lock:
            first = not self.failures
            if probe or first:
                self.failures += 1
            delay = backoff(settings, self.failures, retry_after)
            self.gate = max(self.gate, time.monotonic() + delay)
            return max(self.gate - time.monotonic(), 0.0), first

    def answered(self) -> int:
        """Koala answered (2xx or a final 4xx): reopen; returns the failures it ends."""
        if not self.failures:  # the usual case, once per delivered batch: no lock needed
            return 0
        with self._lock:
            failures, self.failures, self.gate = self.failures, 0, 0.0
            return failures


class _Sender:
    """Shared skeleton: accounting, hooks and the retry verdicts for both delivery modes."""

    def __init__(self, settings: DeliverySettings, on_error: ErrorHook | None) -> None:
        self.settings = settings
        self.on_error = on_error
        self.counters = _Counters()
        self._health = _Health()
        _live_senders.add(self)

    def _headers(self, batch: Batch) -> dict[str, str]:
        return {"Content-Type": "application/json", "User-Agent": batch.user_agent}

    def _give_up(self, batch: Batch, error: DeliveryError) -> None:
        self.counters.dropped(error.reason, 1, len(batch.message_ids), error.detail)
        if self.on_error is not None:
            try:
                self.on_error(batch, error)
            except Exception:
                logger.exception(LOG_HOOK_FAILED)

    def _outcome(
        self, batch: Batch, response: httpx.Response | None, exc: BaseException | None, probe: bool
    ) -> float | None:
        """Account for one attempt; the pause before retrying, or None when the batch is done."""
        verdict, detail, retry_after = classify(response, exc)
        if verdict != "retry":
            failures = self._health.answered()
            if failures:
                logger.info(LOG_RECOVERED, failures)
            if verdict == "ok":
                self.counters.delivered(batch)
            else:
                assert response is not None
                self._give_up(batch, DeliveryError("rejected", detail, response.status_code))
            return None
        delay, first = self._health.failed(self.settings, probe, retry_after)
        if first:
            logger.warning(LOG_UNAVAILABLE, detail, delay)
        batch.attempts += 1
        if batch.attempts > self.settings.max_retries:
            status = response.status_code if response is not None else None
            self._give_up(
                batch, DeliveryError("retries_exhausted", f"{batch.attempts} attempts, last: {detail}", status)
            )
            return None
        logger.debug(LOG_RETRY, detail, batch.attempts, delay)
        return delay

    def after_fork(self) -> None:
        """In a forked child: forget the parent's state (never close its sockets)."""
        self.counters = _Counters()
        self._health = _Health()

    def park(self) -> bool:
        """Before a fork: hold the sender thread at a safe point; True if it is held."""
        return False

    def unpark(self) -> None:
        """After a fork, in the parent: let the sender thread go on."""


class SyncSender(_Sender):
    """``sync=True``: deliver in the caller's thread, for serverless and scripts.

    Background threads are frozen between invocations there, so a batch must be sent
    before the response finishes. Retries follow the same rules, but one batch takes at most
    ``timeout`` seconds in all, attempts and pauses included; and while Koala keeps failing
    the shared backoff soon exceeds that budget, so each batch gets one attempt, not many.
    Nothing raises into the caller: what cannot be sent is counted and passed to
    ``on_error``.
    """

    def __init__(self, settings: DeliverySettings, on_error: ErrorHook | None) -> None:
        super().__init__(settings, on_error)
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                transport = self.settings.transport
                self._client = httpx.Client(
                    timeout=self.settings.timeout,
                    transport=transport if isinstance(transport, httpx.BaseTransport) else None,
                )
            return self._client

    def submit(self, batch: Batch) -> bool:
        self.counters.add("enqueued")
        try:
            self._send(batch)
        except Exception as error:  # never into the host's request
            self._give_up(batch, DeliveryError("error", f"{type(error).__name__}: {error}"))
        return True

    def _send(self, batch: Batch) -> None:
        deadline = time.monotonic() + self.settings.timeout
        url = self.settings.base_url + batch.path
        while True:
            remaining = deadline - time.monotonic()
            response = exc = None
            try:
                response = self._http().post(
                    url, content=batch.body, headers=self._headers(batch), timeout=max(remaining, 0.01)
                )
            except httpx.HTTPError as error:
                exc = error
            delay = self._outcome(batch, response, exc, probe=True)
            if delay is None:
                return
            if time.monotonic() + delay >= deadline:
                self._give_up(batch, DeliveryError(
                    "retries_exhausted", f"sync budget of {self.settings.timeout:g}s spent after "
                    f"{batch.attempts} attempt(s)", response.status_code if response is not None else None,
                ))
                return
            self.counters.add("retried")
            time.sleep(delay)

    def pending(self) -> int:
        return 0

    def flush(self, timeout: float) -> bool:
        return True

    def shutdown(self, timeout: float) -> bool:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        self.counters.report()
        return True

    def after_fork(self) -> None:
        super().after_fork()
        self._client = None  # the parent's connections: dropped, not closed (a TLS close would write)
        self._lock = threading.Lock()


class BackgroundSender(_Sender):
    """The default: a bounded queue drained by a daemon thread's asyncio loop.

    The bounds (``max_queue_batches``, ``max_queue_bytes``) cover every batch not finished
    yet: waiting, in flight, or between retries; so they bound the memory Koala can cost.
    """

    def __init__(self, settings: DeliverySettings, on_error: ErrorHook | None) -> None:
        super().__init__(settings, on_error)
        self._init_state()

    def _init_state(self) -> None:
        # Native locks: the sender is an OS thread even under gevent (see _native).
        self._lock = _native.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: collections.deque[Batch] = collections.deque()
        self._pending = 0
        self._pending_bytes = 0
        self._closed = False
        self._thread: _native.SenderThread | None = None
        # Held by the sender thread except while it waits in select(): see park().
        self._running = _native.Lock()
        # The loop's side; set by the sender thread.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._loop_idle = False  # the loop waits for a submit to wake it
        self._probing = False

    def after_fork(self) -> None:
        super().after_fork()
        self._init_state()

    # -- the request side (any thread): cheap, never blocks on the network ----------------

    def submit(self, batch: Batch) -> bool:
        size = len(batch.body)
        settings = self.settings
        start = wake = None
        with self._lock:
            if self._closed:
                reason = "shutdown"
            elif self._pending >= settings.max_queue_batches:
                reason = "queue_full"
            elif self._pending_bytes + size > settings.max_queue_bytes:
                reason = "queue_bytes_full"
            else:
                reason = ""
                self._queue.append(batch)
                self._pending += 1
                self._pending_bytes += size
                self.counters.enqueued_locked()
                if self._thread is None:
                    start = self._thread = _native.SenderThread(self._run_thread, "koala-sender")
                elif self._loop_idle:
                    self._loop_idle = False
                    wake = self._loop
        if reason:
            self._give_up(batch, DeliveryError(reason, "not queued: " + (
                "the client is shut down" if reason == "shutdown" else "the queue is at its bound"
            )))
            return False
        if start is not None:
            self._start(start)
        elif wake is not None:
            try:
                wake.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop closed under us (interpreter exit)
                pass
        return True

    def pending(self) -> int:
        return self._pending

    def flush(self, timeout: float) -> bool:
        """Wait until all batches handed over so far are delivered or given up."""
        deadline = time.monotonic() + max(timeout, 0.0)
        thread = self._thread
        if thread is not None and thread.is_current():  # an on_error hook: never wait on ourselves
            return not self._pending
        with self._idle:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def shutdown(self, timeout: float) -> bool:
        """Flush within ``timeout``, then stop; what is left is counted as dropped, once.

        Returns within about ``timeout`` even if Koala never answers: the last part of it
        is kept for cancelling the requests in flight, which count themselves.
        """
        timeout = max(timeout, 0.0)
        deadline = time.monotonic() + timeout
        flushed = self.flush(timeout - min(0.25, timeout / 10))
        with self._lock:
            self._closed = True
            undelivered = self._pending
            leftover = list(self._queue)
            self._queue.clear()
            thread, loop = self._thread, self._loop
        if undelivered:
            logger.warning(LOG_SHUTDOWN_LOST, undelivered)
        for batch in leftover:
            self._give_up(batch, DeliveryError("shutdown", "still queued at shutdown"))
            self._finish(batch)
        if thread is not None and loop is not None and thread.is_alive():
            try:
                loop.call_soon_threadsafe(self._wake)  # it sees _closed and stops
            except RuntimeError:  # already closed
                pass
            if not thread.is_current():
                thread.join(max(deadline - time.monotonic(), 0.05))
        self.counters.report()
        return flushed

    # -- the sender thread ------------------------------------------------------------------

    def _start(self, thread: _native.SenderThread) -> None:
        try:
            thread.start()
        except RuntimeError as error:  # "can't create new thread" (interpreter exit, limits)
            with self._lock:
                self._thread = None
                stranded = list(self._queue)
                self._queue.clear()
            for batch in stranded:
                self._give_up(batch, DeliveryError("error", f"no sender thread: {error}"))
                self._finish(batch)

    def _run_thread(self) -> None:
        running = self._running
        running.acquire()
        _declare_asyncio()
        loop = _native.new_event_loop(_ParkingSelector(running))
        try:
            loop.run_until_complete(self._main())
        except Exception:
            logger.exception(LOG_SENDER_FAILED)
        finally:
            with self._lock:
                if self._thread is not None and self._thread.is_current():
                    self._thread = None  # a later submit starts a new one
                    self._loop = None
                    self._loop_idle = False
            loop.close()
            running.release()

    def park(self) -> bool:
        thread = self._thread
        if thread is None or not thread.is_alive() or thread.is_current():
            return False
        # Bounded: a sender stuck in an on_error hook must not block the host's fork.
        return self._running.acquire(timeout=FORK_PARK_TIMEOUT)

    def unpark(self) -> None:
        self._running.release()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _transports(self) -> list[httpx.AsyncBaseTransport]:
        settings = self.settings
        if isinstance(settings.transport, httpx.AsyncBaseTransport):
            return [settings.transport]
        per_pool = max(1, settings.connections_per_pool)
        pools = max(1, -(-settings.max_in_flight // per_pool))
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        # One TLS context for all pools: each costs about 20 ms of CPU to build (with
        # verify=True every pool builds its own, even for plain HTTP). Over http:// it is
        # never used; a bare one, verifying with no CA, costs under a millisecond.
        verify = (
            httpx.create_ssl_context()
            if settings.base_url.startswith("https:")
            else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        )
        return [httpx.AsyncHTTPTransport(limits=limits, verify=verify) for _ in range(pools)]

    def _take(self, in_flight: int) -> tuple[Batch | None, float | None, bool]:
        """The next batch to send (and whether it is a probe), or how long to wait."""
        with self._lock:
            if not self._queue:
                self._loop_idle = True
                return None, None, False
            if in_flight >= self.settings.max_in_flight:
                return None, None, False  # a finishing task wakes us
            probe = False
            if self._health.failures:
                if self._probing:
                    return None, None, False  # the probe's answer wakes us
                wait = self._health.gate - time.monotonic()
                if wait > 0:
                    return None, wait, False
                probe = self._probing = True
            return self._queue.popleft(), None, probe

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup = asyncio.Event()
        with self._lock:
            self._loop, self._wakeup = loop, wakeup
        transports = self._transports()
        post = _Poster(self.settings)
        load = [0] * len(transports)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while not self._closed:
                wakeup.clear()
                batch, wait, probe = self._take(len(tasks))
                if batch is None:
                    try:
                        await asyncio.wait_for(wakeup.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                    continue
                shard = load.index(min(load))
                load[shard] += 1
                task = loop.create_task(self._deliver(post, transports[shard], batch, probe))
                tasks.add(task)

                def done(task: asyncio.Task[None], shard: int = shard) -> None:
                    tasks.discard(task)
                    load[shard] -= 1
                    wakeup.set()

                task.add_done_callback(done)
        finally:
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for transport in transports:
                try:
                    await transport.aclose()
                except Exception:  # closing sockets Koala left half-open: nothing to do
                    pass

    async def _deliver(
        self, post: _Poster, transport: httpx.AsyncBaseTransport, batch: Batch, probe: bool
    ) -> None:
        response = exc = None
        try:
            response = await post(transport, batch)
        except asyncio.CancelledError:  # shutdown while in flight: Koala may have it or not
            self._give_up(batch, DeliveryError("shutdown", "in flight at shutdown"))
            self._finish(batch)
            raise
        except Exception as error:  # httpx errors, and anything a custom transport raises
            exc = error
        try:
            delay = self._outcome(batch, response, exc, probe)
        except Exception as error:  # a bug here must not strand the batch (flush would wait)
            logger.exception(LOG_UNEXPECTED)
            self._give_up(batch, DeliveryError("error", f"{type(error).__name__}: {error}"))
            delay = None
        finally:
            if probe:
                self._probing = False
        if delay is None:
            self._finish(batch)
        else:
            self.counters.add("retried")
            self._requeue(batch)

    def _requeue(self, batch: Batch) -> None:
        """Back of the queue: the next attempt is a probe, or waits for the others' turn."""
        with self._lock:
            if not self._closed:
                self._queue.append(batch)
                return
        self._give_up(batch, DeliveryError("shutdown", f"failed at shutdown after {batch.attempts} attempt(s)"))
        self._finish(batch)

    def _finish(self, batch: Batch) -> None:
        """A batch is done (counted first, so that a returning flush sees its stats)."""
        with self._idle:
            self._pending -= 1
            self._pending_bytes -= len(batch.body)
            if not self._pending:
                self._idle.notify_all()


class _Poster:
    """Posts a batch straight through a transport, with what every request shares built once.

    ``httpx.AsyncClient`` would merge default headers, cookies, auth and redirects into
    each request, none of which a post to Koala needs; skipping them saves about a fifth
    of the sender's CPU per batch. The request carries what Koala reads (``Host``,
    ``Content-Type``, ``Content-Length``, ``User-Agent``; not httpx's ``Accept*`` and
    ``Connection`` defaults) and the same per-request timeouts; the response is read in
    full, so retries classify it as before. A ``transport=`` given for tests goes the
    same way.
    """

    __slots__ = ("_base", "_extensions", "_host", "_urls")

    def __init__(self, settings: DeliverySettings) -> None:
        self._base = settings.base_url
        self._urls: dict[str, httpx.URL] = {}
        self._host = httpx.URL(settings.base_url).netloc
        self._extensions = {"timeout": httpx.Timeout(settings.timeout).as_dict()}

    def _url(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self._base + path)
        return url

    async def __call__(self, transport: httpx.AsyncBaseTransport, batch: Batch) -> httpx.Response:
        headers = [
            (b"Host", self._host),
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"%d" % len(batch.body)),
            (b"User-Agent", batch.user_agent.encode("ascii")),
        ]
        request = httpx.Request(
            "POST", self._url(batch.path), headers=headers, stream=httpx.ByteStream(batch.body),
            extensions=self._extensions,
        )
        response = await transport.handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response


def _declare_asyncio() -> None:
    """Tell sniffio this thread runs asyncio: httpcore and anyio ask it about 18 times a
    batch, and a thread's own answer is its cheapest lookup (some 7 µs, 1-2% of the CPU)."""
    try:
        import sniffio
    except ImportError:  # a declared dependency, but its absence must not stop delivery
        return
    sniffio.thread_local.name = "asyncio"


FORK_PARK_TIMEOUT = 1.0


class _ParkingSelector(selectors.BaseSelector):
    """The sender loop's selector: ``running`` is released only while waiting for I/O.

    So whoever holds ``running`` (a fork about to happen) knows the sender thread is in
    ``select()``, in no import and holding no lock of any library.

    It wraps the selector :mod:`._native` picks when the thread starts: the original one
    even where gevent patched ``selectors`` after this module was imported.
    """

    def __init__(self, running: _native.LockType) -> None:
        self._selector = _native.new_selector()
        self._running = running

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._running.release()
        try:
            return self._selector.select(timeout)
        finally:
            self._running.acquire()

    def register(self, fileobj: FileDescriptorLike, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._selector.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._selector.unregister(fileobj)

    def modify(self, fileobj: FileDescriptorLike, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._selector.modify(fileobj, events, data)

    def get_key(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._selector.get_key(fileobj)

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self._selector.get_map()

    def close(self) -> None:
        self._selector.close()


_live_senders: weakref.WeakSet[_Sender] = weakref.WeakSet()
_parked: list[_Sender] = []


def _before_fork() -> None:
    _parked.extend(sender for sender in list(_live_senders) if sender.park())


def _after_fork_in_parent() -> None:
    while _parked:
        _parked.pop().unpark()


def _after_fork_in_child() -> None:
    _parked.clear()
    for sender in list(_live_senders):
        sender.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
    )
