"""The background sender: one daemon thread running an asyncio loop that drains the queue.

Handing a batch over is an append to the bounded queue. The thread starts on the first
batch (never at import or configuration: gunicorn ``--preload`` forks after those) and
posts batches concurrently, as many as Koala's health allows (see ``_policy``). A failed
batch waits on its own schedule, then goes to the back of the queue, so a batch Koala keeps
refusing cannot stall the others; it is given up after ``max_retries`` failed attempts (and,
while Koala fails for everyone, ``retry_for`` seconds). A retry posts the batch's same
bytes, hence its ``message_id``\\s, so Koala deduplicates.

With a spool (``spool_dir``), every batch is also on disk from its hand-over until it is
done (see ``_spool``); the thread then starts at once if the spool directory holds batches
left by processes that are gone, adopts them, and looks for more every ``ADOPT_EVERY``
seconds. A batch that exhausts its retries stays on disk and is tried again every
``max_backoff`` seconds (at least ``SPOOL_RETRY_MIN``) instead of being dropped; one that
finds the queue full waits on disk for room; what shutdown leaves stays for the next
process.

During a fork the parent's sender thread is parked in its ``select()``: a thread copied
mid-step could hold a lock the child then waits on forever, such as an import lock (HTTP
libraries import lazily, on first use).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import selectors
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._protocol import Batch
from . import _native
from ._engine import Engine, background_engine
from ._policy import DOWN
from ._queue import BatchQueue, Waiting
from ._request import DETAIL_UNBUILDABLE, Request, build
from ._sender import Sender
from ._settings import DeliverySettings
from ._spool import NoSpool, Spool
from ._stats import DeliveryError, ErrorHook

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

logger = logging.getLogger("koala_middleware")

DETAIL_SPOOL_LOST = "on disk in a spool file that turned out unreadable (set aside as *.corrupt)"
LOG_SHUTDOWN_LOST = "shutdown timed out with %d batch(es) undelivered"
LOG_SENDER_FAILED = "the sender thread failed; it restarts with the next batch"
LOG_UNEXPECTED = "unexpected error after posting a batch; counted as dropped ('error')"

FORK_PARK_TIMEOUT = 1.0
#: How often the sender looks for spool files of processes that are gone.
ADOPT_EVERY = 60.0
#: The shortest pause before a spooled batch that exhausted its retries is tried again.
SPOOL_RETRY_MIN = 1.0
#: While busy, the sender deletes finished batches from the spool once this many piled up,
#: or this many seconds after the last time: one transaction for many rows instead of one
#: per batch (which cost a fifth of the sender's throughput).
SPOOL_SYNC_AFTER = 100
SPOOL_SYNC_EVERY = 0.05
#: How often the sender looks for batches on disk only while some wait there.
SPOOL_LOAD_EVERY = 0.05
#: Spooled batch verdicts that keep the batch on disk, to be loaded again later.
_KEPT_ON_DISK = frozenset({"retries_exhausted", "queue_full", "queue_bytes_full"})


class BackgroundSender(Sender):
    """The default: a bounded queue drained by a daemon thread's asyncio loop."""

    def __init__(self, settings: DeliverySettings, on_error: ErrorHook | None) -> None:
        super().__init__(settings, on_error)
        spool_dir = settings.spool_dir
        self._spool: NoSpool = (
            NoSpool() if spool_dir is None else Spool(spool_dir, settings.max_spool_bytes, settings.base_url)
        )
        if self._spool.enabled:  # (NoSpool calls neither: no reference cycle through it)
            self._spool.on_stranded = self._stranded
            self._spool.on_spooled = functools.partial(self.counters.add, "spooled")
        self._init_state()
        if self._recover():
            self._ensure_thread()

    def _init_state(self) -> None:
        self._queue = BatchQueue(self.settings)
        self._thread: _native.SenderThread | None = None
        # Held by the sender thread except while it waits in select(): see park().
        self._running = _native.Lock()
        # The loop's side; set by the sender thread.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._loop_idle = False  # the loop waits for a submit to wake it
        self._next_adoption = time.monotonic() + ADOPT_EVERY
        self._synced = 0.0  # when the sender last deleted finished batches from the spool
        self._spool_loaded = 0.0  # when it last loaded batches from the spool
        self._spool_due = 0.0  # when the next batch on disk only is due (as of that load)

    def after_fork(self) -> None:
        super().after_fork()
        self._spool.after_fork()
        if self._spool.enabled:
            self._spool.on_spooled = functools.partial(self.counters.add, "spooled")  # the child's counters
        self._init_state()

    # -- the request side (any thread): cheap, never blocks on the network ----------------

    def submit(self, batch: Batch) -> bool:
        if self._spool.enabled:  # a class attribute read, not NoSpool.add() called: one call less
            spooled = self._spool.add(batch)
            if spooled == "spool_full":
                self._give_up(batch, DeliveryError("spool_full", "not queued: the spool is at max_spool_bytes"))
                return False
            if not spooled:
                self.counters.add("spooled")
        queue = self._queue
        start = wake = None
        with queue.lock:
            reason = queue.admit_locked(batch)
            if not reason:
                self.counters.enqueued_locked()
                if self._thread is None:
                    start = self._thread = _native.SenderThread(self._run_thread, "koala-sender")
                elif self._loop_idle:
                    self._loop_idle = False
                    wake = self._loop
        if reason in _KEPT_ON_DISK and self._keep_on_disk(batch, reason):
            self.counters.add("enqueued")  # queued on disk, loaded when there is room
            return True
        if reason:
            self._give_up(
                batch,
                DeliveryError(
                    reason,
                    "not queued: "
                    + ("the client is shut down" if reason == "shutdown" else "the queue is at its bound"),
                ),
            )
            return False
        if start is not None:
            self._start(start)
        elif wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed under us (interpreter exit)
                wake.call_soon_threadsafe(self._wake)
        return True

    def pending(self) -> int:
        return self._queue.pending + self._queue.backlog

    @property
    def spooling(self) -> bool:
        """Whether it has a spool (whose files shutdown releases)."""
        return self._spool.enabled

    def flush(self, timeout: float) -> bool:
        """Wait until all batches handed over so far are delivered or given up."""
        thread = self._thread
        if thread is not None and thread.is_current():  # an on_error hook: never wait on ourselves
            return not self._queue.pending
        flushed = self._queue.wait_idle(timeout)
        if flushed:
            self._spool.sync()  # and off the disk, even if the process ends right after
        return flushed

    def shutdown(self, timeout: float) -> bool:
        """Flush within ``timeout``, then stop; what is left is counted as dropped, once
        (with a spool it stays on disk instead, for the next process).

        Returns within about ``timeout`` even if Koala never answers: the last part of it
        is kept for cancelling the requests in flight, which count themselves.
        """
        timeout = max(timeout, 0.0)
        deadline = time.monotonic() + timeout
        flushed = self.flush(timeout - min(0.25, timeout / 10))
        undelivered, leftover = self._queue.close()
        with self._queue.lock:
            thread, loop = self._thread, self._loop
        if undelivered and not self._spool.enabled:
            logger.warning(LOG_SHUTDOWN_LOST, undelivered)
        for batch in leftover:
            self._give_up(batch, DeliveryError("shutdown", "still queued at shutdown"))
            self._queue.finish(batch)
        if thread is not None and loop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # already closed
                loop.call_soon_threadsafe(self._wake)  # it sees the queue closed and stops
            if not thread.is_current():
                thread.join(max(deadline - time.monotonic(), 0.05))
        self._spool.close()  # what is left stays on disk, for the next process
        self.counters.report()
        return flushed

    def _give_up(self, batch: Batch, error: DeliveryError) -> None:
        """With a spool, a batch it holds is not given up while the disk can keep it: it
        waits there for the slow retry (retries exhausted), for room (queue full), or for
        the next process (shutdown). Otherwise it leaves the disk and is counted."""
        spool = self._spool
        if spool.holds(batch):
            if self._keep_on_disk(batch, error.reason):
                return
            spool.remove(batch)
        super()._give_up(batch, error)

    def _keep_on_disk(self, batch: Batch, reason: str) -> bool:
        spool = self._spool
        if not spool.holds(batch):
            return False
        if reason == "shutdown":
            return True
        if reason not in _KEPT_ON_DISK or self._queue.closed:
            return False
        later = max(self.settings.max_backoff, SPOOL_RETRY_MIN) if reason == "retries_exhausted" else 0.0
        self._queue.add_backlog(1)  # before the caller finishes it in memory, if it was there
        if spool.park(batch, time.monotonic() + later):
            batch.attempts = 0
            return True
        self._queue.add_backlog(-1)
        return False

    def _stranded(self, count: int, lost: bool) -> None:
        """Batches on disk only that can no longer be loaded: out of the backlog; counted as
        dropped when their file was set aside (otherwise the next process adopts them)."""
        self._queue.add_backlog(-count)
        if lost:
            self.counters.dropped("error", count, 0, DETAIL_SPOOL_LOST)

    def _recover(self) -> int:
        """Adopt the spool files of processes that are gone; how many batches they hold."""
        recovered = self._spool.scan()
        if recovered:
            self.counters.add("recovered", recovered)
            self._queue.add_backlog(recovered)
        return recovered

    def _sync_spool(self, idle: bool, wait: float | None) -> float | None:
        """Delete finished batches from disk if idle or due; the loop's wait, capped so that
        the rest are deleted soon."""
        now = time.monotonic()
        if idle or self._spool.finished >= SPOOL_SYNC_AFTER or now - self._synced >= SPOOL_SYNC_EVERY:
            self._spool.sync()
            self._synced = now
            return wait
        return SPOOL_SYNC_EVERY if wait is None else min(wait, SPOOL_SYNC_EVERY)

    def _ensure_thread(self) -> None:
        with self._queue.lock:
            if self._thread is not None:
                return
            start = self._thread = _native.SenderThread(self._run_thread, "koala-sender")
        self._start(start)

    def _refill(self) -> float | None:
        """Load what the spool has due into the queue (and adopt what dead processes left,
        now and then); the seconds until the spool next needs a look, None if only a
        finishing batch can change that."""
        spool, queue = self._spool, self._queue
        if not spool.enabled:
            return None
        now = time.monotonic()
        if now >= self._next_adoption:
            self._next_adoption = now + ADOPT_EVERY
            self._recover()
        wait = self._next_adoption - now
        if not queue.backlog or queue.room() <= 0:
            return wait  # nothing on disk only, or no room for it: a finishing batch wakes us
        # Not on every turn of the loop: when the next row is due, and every
        # SPOOL_LOAD_EVERY seconds for rows parked since the last look (by other threads).
        if now >= self._spool_due or now - self._spool_loaded >= SPOOL_LOAD_EVERY:
            batches, due = spool.load(now, min(queue.room(), self.settings.max_in_flight))
            queue.reload(batches)
            self._spool_loaded = now
            self._spool_due = due if due is not None else now + SPOOL_LOAD_EVERY
        if not queue.waiting:
            wait = min(wait, max(min(self._spool_due, self._spool_loaded + SPOOL_LOAD_EVERY) - now, 0.0))
        return wait

    # -- the sender thread ------------------------------------------------------------------

    def _start(self, thread: _native.SenderThread) -> None:
        try:
            thread.start()
        except RuntimeError as error:  # "can't create new thread" (interpreter exit, limits)
            with self._queue.lock:
                self._thread = None
            for batch in self._queue.strand():
                self._give_up(batch, DeliveryError("error", f"no sender thread: {error}"))
                self._queue.finish(batch)

    def _run_thread(self) -> None:
        running = self._running
        running.acquire()
        loop = _native.new_event_loop(_ParkingSelector(running))
        try:
            loop.run_until_complete(self._main())
        except Exception:
            logger.exception(LOG_SENDER_FAILED)
        finally:
            with self._queue.lock:
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

    def _take(self, in_flight: int) -> tuple[Waiting | None, float | None, bool]:
        """The next batch to send (and whether it is a probe), or how long to wait.

        Retries due by now join the back of the queue first; then Koala's health (see
        ``_policy``) says how many attempts may be in flight.
        """
        queue = self._queue
        with queue.lock:
            due = queue.release_due_locked(time.monotonic()) if queue.scheduled else None
            if not queue.waiting:
                self._loop_idle = True  # a submit wakes us; a scheduled retry's due time too
                return None, due, False
            held = self._health.held()
            if held:
                return None, _sooner(held, due), False  # Retry-After: whatever else succeeds meanwhile
            start, wait = self._health.admit(in_flight, self.settings.max_in_flight)
            if not start:
                return None, _sooner(wait, due), False  # a finishing task wakes us, or the wait
            # Down: one attempt at a time, a probe whose failure lengthens the pause.
            return queue.waiting.popleft(), None, self._health.state == DOWN

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup = asyncio.Event()
        self._spool.prepare()
        with self._queue.lock:
            self._loop, self._wakeup = loop, wakeup
        post = background_engine(self.settings)
        tasks: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            wakeup.set()

        try:
            while not self._queue.closed:
                wakeup.clear()
                spool_wait = self._refill()
                item, wait, probe = self._take(len(tasks))
                if self._spool.needs_sync:
                    spool_wait = self._sync_spool(item is None and not tasks, spool_wait)
                if item is None:
                    if spool_wait is not None:
                        wait = spool_wait if wait is None else min(wait, spool_wait)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(wakeup.wait(), wait)
                    continue
                task = loop.create_task(self._deliver(post, item, probe))
                tasks.add(task)
                task.add_done_callback(done)
        finally:
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):  # closing sockets Koala left half-open: nothing to do
                await post.close()

    def _build(self, batch: Batch) -> Request | None:
        """The batch's request, or None when none can be built: then it is dropped alone."""
        try:
            return build(self.settings.base_url, batch)
        except Exception as error:
            self._give_up(batch, DeliveryError("error", DETAIL_UNBUILDABLE % (type(error).__name__, error)))
            self._queue.finish(batch)
            return None

    async def _deliver(self, post: Engine, item: Waiting, probe: bool) -> None:
        request = self._build(item) if isinstance(item, Batch) else item
        if request is not None:
            await self._attempt(post, request, probe)

    async def _attempt(self, post: Engine, request: Request, probe: bool) -> None:
        batch = request.batch
        answer = exc = None
        try:
            answer = await post(request)
        except asyncio.CancelledError:  # shutdown while in flight: Koala may have it or not
            self._give_up(batch, DeliveryError("shutdown", "in flight at shutdown"))
            self._queue.finish(batch)
            raise
        except Exception as error:  # network errors, timeouts, anything an engine raises
            exc = error
        try:
            delay = self._outcome(request, answer, exc, probe)
        except Exception as error:  # a bug here must not strand the batch (flush would wait)
            logger.exception(LOG_UNEXPECTED)
            self._give_up(batch, DeliveryError("error", f"{type(error).__name__}: {error}"))
            delay = None
        if delay is None:
            self._spool.remove(batch)  # delivered (a batch given up has left the spool already)
            self._queue.finish(batch)
        else:
            self.counters.add("retried")
            # Its own due time: a batch Koala keeps refusing never holds the others.
            if not self._queue.schedule(request, time.monotonic() + delay):
                self._give_up(batch, DeliveryError("shutdown", f"failed at shutdown after {batch.attempts} attempt(s)"))
                self._queue.finish(batch)

    def _recovered(self) -> None:
        self._queue.release_all()  # their short pauses must not outlive the outage


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


def _sooner(wait: float | None, other: float | None) -> float | None:
    """The shorter of two waits, None meaning "until woken"."""
    if wait is None:
        return other
    return wait if other is None else min(wait, other)
