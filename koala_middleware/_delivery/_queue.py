"""The bounded queue between the request path and the sender thread.

Its bounds (``max_queue_batches``, ``max_queue_bytes``) cover every batch not finished yet:
waiting, in flight, or between retries; so they bound the memory Koala can cost. A hand-over
past them is refused at once (the caller counts it), never blocking a request.

With a spool, ``backlog`` counts the batches that are on disk only (adopted from a process
that is gone, or waiting for the spool's slow retry): outside the bounds, since they cost no
memory, but unfinished, so a flush waits for them too. They come in through :meth:`reload`.

A batch whose attempt failed waits in ``scheduled`` until its own due time (see
``_policy``), then goes to the back of ``waiting``: it never holds the queue or the sender.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import sys
import threading
import time
from typing import Literal

from .._protocol import Batch
from . import _native
from ._request import Request
from ._settings import DeliverySettings

#: A batch waiting for its first attempt, or its request waiting for another one.
Waiting = Batch | Request


#: What a queued batch holds besides its body's bytes and its User-Agent: the ``Batch``
#: object, the bytes object's header, its slot in the deque, and the allocator's rounding.
#: Measured with ``bench/memory.py`` (RSS grown per queued batch, 20,000 batches).
BATCH_OVERHEAD = 120
#: A User-Agent longer than this many bytes is counted twice (see ``cost``).
LONG_USER_AGENT = 512


#: ``sys.getsizeof`` of an ASCII str less its length (49 bytes on CPython 3.11).
ASCII_STR_HEADER = sys.getsizeof("")


def cost(batch: Batch) -> int:
    """The bytes a batch counts for against ``max_queue_bytes``: what it holds.

    Its body (which carries the IP) and its User-Agent (its real size, up to 4 bytes a
    character), and the rest. While a batch is in flight the HTTP layer holds a copy of its
    User-Agent (the header line; an escaped copy when it is not ASCII): a long or non-ASCII
    one is counted twice, so that thousands of 64 KB User-Agents stay within the bound; a
    usual one's copy (at most ``max_in_flight`` of them, as the request built for an attempt)
    is within the overhead's rounding. Counting a usual batch once keeps the count within a
    few percent of the memory it holds (it counted 1.9x, so a bound held about half the
    batches its size suggests). Runs on the request path: O(1), and the usual User-Agent's
    size is its length plus a str's header, not a ``sys.getsizeof`` call.
    """
    user_agent = batch.user_agent
    size = len(user_agent) + ASCII_STR_HEADER  # sys.getsizeof(user_agent) when it is ASCII
    if size > LONG_USER_AGENT or not user_agent.isascii():
        size = 2 * sys.getsizeof(user_agent)
    return len(batch.body) + size + BATCH_OVERHEAD


class BatchQueue:
    """Batches handed over and not finished, with their bounds and a wait for "all done".

    ``lock`` orders every hand-over; the sender holds it too when it decides what to post
    next, so that decision and its own state (is the loop idle?) change together.
    """

    def __init__(self, settings: DeliverySettings) -> None:
        # A native lock: the sender is an OS thread even under gevent (see _native).
        self.lock = _native.Lock()
        self._idle = threading.Condition(self.lock)
        self.waiting: collections.deque[Waiting] = collections.deque()
        #: Requests between attempts: (due time, order of scheduling, request), a heap.
        self.scheduled: list[tuple[float, int, Request]] = []
        self._order = itertools.count()
        self.pending = 0
        self.pending_bytes = 0
        self.backlog = 0
        self.closed = False
        self._max_batches = settings.max_queue_batches
        self._max_bytes = settings.max_queue_bytes

    def admit_locked(self, batch: Batch) -> Literal["", "queue_full", "queue_bytes_full", "shutdown"]:
        """Queue ``batch`` (the caller holds ``lock``); "" or the reason it was refused."""
        if self.closed:
            return "shutdown"
        if self.pending >= self._max_batches:
            return "queue_full"
        size = cost(batch)
        if self.pending_bytes + size > self._max_bytes:
            return "queue_bytes_full"
        self.waiting.append(batch)
        self.pending += 1
        self.pending_bytes += size
        return ""

    def schedule(self, request: Request, due: float) -> bool:
        """Another attempt at ``due`` (``time.monotonic()``); False once closed (the caller
        gives up)."""
        with self.lock:
            if self.closed:
                return False
            heapq.heappush(self.scheduled, (due, next(self._order), request))
            return True

    def release_due_locked(self, now: float) -> float | None:
        """Move the requests due by ``now`` to the back of ``waiting`` (the caller holds
        ``lock``); seconds until the next one is due, None when none is scheduled."""
        scheduled = self.scheduled
        while scheduled and scheduled[0][0] <= now:
            self.waiting.append(heapq.heappop(scheduled)[2])
        return scheduled[0][0] - now if scheduled else None

    def release_all(self) -> None:
        """Every scheduled request is due now (Koala answers again after an outage)."""
        with self.lock:
            for _, _, request in sorted(self.scheduled):
                self.waiting.append(request)
            self.scheduled.clear()

    def finish(self, batch: Batch) -> None:
        """A batch is done (counted first, so that a returning flush sees its stats)."""
        with self._idle:
            self.pending -= 1
            self.pending_bytes -= cost(batch)
            if not self.pending and not self.backlog:
                self._idle.notify_all()

    def add_backlog(self, count: int) -> None:
        """``count`` more batches wait on disk (call before finishing one moved there), or
        fewer, when some can no longer be loaded."""
        with self._idle:
            self.backlog += count
            if not self.pending and not self.backlog:
                self._idle.notify_all()

    def room(self) -> int:
        """How many more batches the bounds let into memory."""
        return self._max_batches - self.pending

    def reload(self, batches: list[Batch]) -> None:
        """Batches from the backlog, loaded from disk, back in the queue."""
        with self.lock:
            self.waiting.extend(batches)
            self.pending += len(batches)
            self.pending_bytes += sum(cost(batch) for batch in batches)
            self.backlog -= len(batches)

    def close(self) -> tuple[int, list[Batch]]:
        """Refuse new batches; (batches not finished, those of them still waiting)."""
        with self.lock:
            self.closed = True
            return self.pending, self._take_all()

    def strand(self) -> list[Batch]:
        """Take every waiting batch out (no sender can post them)."""
        with self.lock:
            return self._take_all()

    def _take_all(self) -> list[Batch]:
        waiting = [item if isinstance(item, Batch) else item.batch for item in self.waiting]
        waiting += [request.batch for _, _, request in sorted(self.scheduled)]
        self.waiting.clear()
        self.scheduled.clear()
        return waiting

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every batch handed over so far is finished; False on timeout."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._idle:
            while self.pending or self.backlog:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True
