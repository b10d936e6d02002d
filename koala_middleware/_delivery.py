"""Getting batches to Koala without ever making the host app wait.

Handing a batch over is an append to a bounded in-memory queue. One daemon thread runs an
asyncio loop that posts batches concurrently over pooled, kept-alive httpx connections,
spread over several small pools (one httpx pool slows down as its connection count grows).

Failures follow the docs' advice: network errors, timeouts, 408, 429 and 5xx are retried
with capped exponential backoff and jitter, honouring ``Retry-After``; the retry reuses the
batch's bytes, hence its ``message_id``s, so Koala deduplicates. While Koala is failing, the
whole sender pauses (a shared backoff gate) instead of spinning through the queue; the head
batch is the probe. Other 4xx are final. Everything that does not arrive is counted by
reason in :class:`Stats`, logged (rate limited) and passed to the ``on_error`` hook.

After ``os.fork()`` the child starts with a fresh queue, locks, thread and pools: the
parent's are not usable there (gunicorn ``--preload``, uWSGI, Celery prefork).
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from ._protocol import Batch

logger = logging.getLogger("koala_middleware")

LOG_DROPPED = "koala_middleware: dropped %d batch(es) (%s) in the last %.0fs; see client.stats"
LOG_REJECTED = "koala_middleware: Koala rejected a batch with HTTP %d, not retrying: %s"
LOG_RETRY = "koala_middleware: delivery failed (%s), retry %d in %.2fs"
LOG_HOOK_FAILED = "koala_middleware: the on_error hook raised; ignoring it"
LOG_SHUTDOWN_LOST = "koala_middleware: shutdown timed out with %d batch(es) undelivered"

ErrorHook = Callable[[Batch, "DeliveryError"], None]


class DeliveryError(Exception):
    """Why a batch was given up; passed to the ``on_error`` hook, never raised at callers.

    ``reason`` is the key it is counted under in ``client.stats.dropped``.
    """

    def __init__(self, reason: str, detail: str = "", status: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How the sender talks to Koala; the ``KoalaClient`` options of the same names."""

    base_url: str
    timeout: float = 5.0
    max_queue_batches: int = 10_000
    max_queue_bytes: int = 32 * 1024 * 1024
    max_in_flight: int = 50
    connections_per_pool: int = 5
    max_retries: int = 8
    backoff_base: float = 0.5
    max_backoff: float = 30.0
    transport: httpx.AsyncBaseTransport | httpx.BaseTransport | None = None


@dataclass
class Stats:
    """Counters since the client started (or since fork, in a child process).

    Batches are what the sender posts (one person or account, up to 30 items of each type).
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


class _Counters:
    """Thread-safe counters behind :class:`Stats`, with rate-limited drop warnings."""

    WARN_EVERY = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = Stats()
        self._unwarned: collections.Counter[str] = collections.Counter()
        self._warned_at = 0.0

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + n)

    def delivered(self, batch: Batch) -> None:
        with self._lock:
            self._stats.delivered += 1
            self._stats.events_delivered += len(batch.message_ids)

    def dropped(self, reason: str, batches: int, events: int) -> None:
        with self._lock:
            stats = self._stats
            if batches:
                stats.dropped[reason] = stats.dropped.get(reason, 0) + batches
            if events:
                stats.events_dropped[reason] = stats.events_dropped.get(reason, 0) + events
            self._unwarned[reason] += max(batches, events and 1)
            now = time.monotonic()
            if now - self._warned_at < self.WARN_EVERY:
                return
            since, self._warned_at = now - self._warned_at, now
            report, self._unwarned = self._unwarned, collections.Counter()
        for why, count in report.items():
            logger.warning(LOG_DROPPED, count, why, min(since, 1e6))

    def snapshot(self, queued: int) -> Stats:
        with self._lock:
            s = self._stats
            return Stats(
                s.enqueued, s.delivered, s.retried, s.dry_run, s.events_delivered,
                dict(s.dropped), dict(s.events_dropped), queued,
            )


def backoff(settings: DeliverySettings, failures: int, retry_after: float | None) -> float:
    """Capped exponential backoff with full jitter; ``Retry-After`` wins, within the cap."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), settings.max_backoff)
    ceiling = min(settings.max_backoff, settings.backoff_base * 2 ** max(failures - 1, 0))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return None if when is None else when.timestamp() - time.time()


def classify(response: httpx.Response | None, exc: BaseException | None) -> tuple[str, str, float | None]:
    """``("ok"|"retry"|"reject", detail, retry_after)`` for one attempt's outcome."""
    if exc is not None:
        return "retry", type(exc).__name__, None
    assert response is not None
    status = response.status_code
    if 200 <= status < 300:
        return "ok", "", None
    if status in (408, 429) or status >= 500:
        try:
            after = _retry_after(response)
        except (TypeError, ValueError, OverflowError):
            after = None
        return "retry", f"HTTP {status}", after
    return "reject", response.text[:500], None


class _Sender:
    """Shared skeleton: accounting, hooks and the drop path for both delivery modes."""

    def __init__(self, settings: DeliverySettings, on_error: ErrorHook | None) -> None:
        self.settings = settings
        self.on_error = on_error
        self.counters = _Counters()

    def _headers(self, batch: Batch) -> dict[str, str]:
        return {"Content-Type": "application/json", "User-Agent": batch.user_agent}

    def _give_up(self, batch: Batch, error: DeliveryError) -> None:
        self.counters.dropped(error.reason, 1, len(batch.message_ids))
        if self.on_error is not None:
            try:
                self.on_error(batch, error)
            except Exception:
                logger.exception(LOG_HOOK_FAILED)

    def _backoff_level(self, batch: Batch) -> int:
        return batch.attempts

    def _outcome(self, batch: Batch, response: httpx.Response | None, exc: BaseException | None) -> float | None:
        """Record one attempt; the delay before a retry, or None when the batch is done."""
        verdict, detail, after = classify(response, exc)
        if verdict == "ok":
            self.counters.delivered(batch)
            return None
        if verdict == "reject":
            assert response is not None
            logger.error(LOG_REJECTED, response.status_code, detail)
            self._give_up(batch, DeliveryError("rejected", detail, response.status_code))
            return None
        batch.attempts += 1
        if batch.attempts > self.settings.max_retries:
            status = response.status_code if response is not None else None
            self._give_up(batch, DeliveryError("retries_exhausted", detail, status))
            return None
        self.counters.add("retried")
        delay = backoff(self.settings, self._backoff_level(batch), after)
        logger.info(LOG_RETRY, detail, batch.attempts, delay)
        return delay


class SyncSender(_Sender):
    """``sync=True``: deliver in the caller's thread, for serverless and scripts.

    Background threads are frozen between invocations there, so a batch must be sent
    before the response finishes. Retries are the same, but bounded by one ``timeout``
    plus the backoff cap in all.
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
        deadline = time.monotonic() + self.settings.timeout + self.settings.max_backoff
        while True:
            response = exc = None
            try:
                response = self._http().post(
                    self.settings.base_url + batch.path, content=batch.body, headers=self._headers(batch)
                )
            except httpx.HTTPError as error:
                exc = error
            delay = self._outcome(batch, response, exc)
            if delay is None:
                return True
            if time.monotonic() + delay > deadline:
                self._give_up(batch, DeliveryError("retries_exhausted", "sync retry budget spent"))
                return True
            time.sleep(delay)

    def pending(self) -> int:
        return 0

    def flush(self, timeout: float) -> bool:
        return True

    def shutdown(self, timeout: float) -> bool:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        return True

    def after_fork(self) -> None:
        self._client = None
        self._lock = threading.Lock()
        self.counters = _Counters()


class BackgroundSender(_Sender):
    """The default: a bounded queue drained by a daemon thread's asyncio loop."""

    def __init__(self, settings: DeliverySettings, on_error: ErrorHook | None) -> None:
        super().__init__(settings, on_error)
        self._init_state()
        _live_senders.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: collections.deque[Batch] = collections.deque()
        self._queued_bytes = 0
        self._pending = 0  # queued + in flight + waiting to retry
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._sleeping = False
        self._gate_until = 0.0
        self._failures = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = threading.Event()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's queue, thread and sockets."""
        self._init_state()
        self.counters = _Counters()

    # -- the request side (any thread): cheap, never blocks on the network ----------------

    def submit(self, batch: Batch) -> bool:
        size = len(batch.body)
        with self._lock:
            if self._closed:
                reason = "shutdown"
            elif len(self._queue) >= self.settings.max_queue_batches:
                reason = "queue_full"
            elif self._queued_bytes + size > self.settings.max_queue_bytes:
                reason = "queue_bytes_full"
            else:
                reason = ""
                self._queue.append(batch)
                self._queued_bytes += size
                self._pending += 1
                if self._thread is None:
                    self._start()
        if reason:
            self._give_up(batch, DeliveryError(reason, "the batch was not queued"))
            return False
        self.counters.add("enqueued")
        if self._sleeping and self._loop is not None:
            self._sleeping = False
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # loop closed during interpreter shutdown
                pass
        return True

    def pending(self) -> int:
        return self._pending

    def flush(self, timeout: float) -> bool:
        """Wait until all batches handed over so far are delivered or given up."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._idle:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def shutdown(self, timeout: float) -> bool:
        """Flush within ``timeout``, then stop; what is left is counted as dropped."""
        flushed = self.flush(timeout)
        with self._lock:
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._stop(), loop)
            except RuntimeError:
                pass
            thread.join(max(1.0, timeout / 4))
        with self._lock:
            leftover = list(self._queue)
            self._queue.clear()
            self._pending -= len(leftover)
        if leftover:
            logger.warning(LOG_SHUTDOWN_LOST, len(leftover))
            for batch in leftover:
                self._give_up(batch, DeliveryError("shutdown", "not delivered before shutdown"))
        return flushed

    # -- the sender thread ------------------------------------------------------------------

    def _start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run_thread, args=(ready,), name="koala-sender", daemon=True
        )
        self._thread.start()
        ready.wait(5.0)

    def _run_thread(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop, ready))
        except asyncio.CancelledError:
            pass
        finally:
            loop.close()
            self._stopped.set()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _clients(self) -> list[httpx.AsyncClient]:
        settings = self.settings
        if isinstance(settings.transport, httpx.AsyncBaseTransport):
            return [httpx.AsyncClient(transport=settings.transport, timeout=settings.timeout)]
        per_pool = max(1, settings.connections_per_pool)
        pools = max(1, -(-settings.max_in_flight // per_pool))
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        return [httpx.AsyncClient(limits=limits, timeout=settings.timeout) for _ in range(pools)]

    async def _main(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        self._wakeup = asyncio.Event()
        self._loop = loop
        self._main_task = asyncio.current_task()
        clients = self._clients()
        load = [0] * len(clients)
        slots = asyncio.Semaphore(max(1, self.settings.max_in_flight))
        ready.set()
        try:
            while True:
                if not self._queue:
                    self._sleeping = True
                    if not self._queue:
                        await self._wakeup.wait()
                    self._sleeping = False
                    self._wakeup.clear()
                    continue
                gate = self._gate_until - loop.time()
                if gate > 0:
                    await asyncio.sleep(gate)
                    continue
                await slots.acquire()
                with self._lock:
                    batch = self._queue.popleft() if self._queue else None
                    if batch is not None:
                        self._queued_bytes -= len(batch.body)
                if batch is None:
                    slots.release()
                    continue
                shard = load.index(min(load))
                load[shard] += 1
                task = loop.create_task(self._deliver(clients[shard], batch))
                self._tasks.add(task)

                def done(task: asyncio.Task[None], shard: int = shard) -> None:
                    self._tasks.discard(task)
                    load[shard] -= 1
                    slots.release()

                task.add_done_callback(done)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for client in clients:
                await client.aclose()

    async def _deliver(self, client: httpx.AsyncClient, batch: Batch) -> None:
        response = exc = None
        try:
            response = await client.post(
                self.settings.base_url + batch.path, content=batch.body, headers=self._headers(batch)
            )
        except asyncio.CancelledError:
            self._finish(batch)
            self._give_up(batch, DeliveryError("shutdown", "in flight at shutdown"))
            raise
        except Exception as error:  # httpx errors, and anything a custom transport raises
            exc = error
        delay = self._outcome(batch, response, exc)
        if delay is None:
            if response is not None and response.is_success:
                self._failures = 0
            self._finish(batch)
            return
        # Koala (or the way to it) is failing: pause everyone, retry this batch first.
        self._failures += 1
        self._gate_until = max(self._gate_until, asyncio.get_running_loop().time() + delay)
        with self._lock:
            self._queue.appendleft(batch)
            self._queued_bytes += len(batch.body)

    def _backoff_level(self, batch: Batch) -> int:
        # One slow-down for the whole sender: a fresh batch at the head of the queue must
        # not restart the backoff while Koala is still failing.
        return max(batch.attempts, self._failures + 1)

    def _finish(self, batch: Batch) -> None:
        with self._idle:
            self._pending -= 1
            if not self._pending:
                self._idle.notify_all()

    async def _stop(self) -> None:
        task = getattr(self, "_main_task", None)
        if task is not None:
            task.cancel()


_live_senders: weakref.WeakSet[BackgroundSender] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for sender in list(_live_senders):
        sender.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
