"""What happened to the batches: counters behind ``client.stats``, and the drop warnings.

Every batch that does not arrive is counted once, by reason, logged (at most once per reason
every ``WARN_EVERY`` seconds, so a Koala outage cannot flood the host app's logs) and passed
to the ``on_error`` hook as a :class:`DeliveryError`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from .._protocol import Batch
from . import _native

logger = logging.getLogger("koala_middleware")

LOG_DROPPED = (
    "dropped %d batch(es), %d event(s) (%s): %s; repeats are summarised every %.0fs, counts are in client.stats"
)
LOG_DROPPED_SUMMARY = "dropped %d more batch(es), %d event(s) (%s) in the last %.1fs; last: %s"
LOG_REJECTED = "HTTP %d, not retried: %s"

#: How much of Koala's answer a log line or an ``on_error`` detail may carry.
EXCERPT_CHARS = 200
REDACTED = "[redacted]"
_EMAIL = re.compile(r"[^\s\"'<>,;:]+@[^\s\"'<>,;:]+")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


#: Why recorded items were not delivered: the keys of ``client.stats.dropped`` and
#: ``events_dropped``, and :attr:`DeliveryError.reason`.
DropReason = Literal[
    "queue_full",
    "queue_bytes_full",
    "spool_full",
    "rejected",
    "retries_exhausted",
    "shutdown",
    "error",
    "tracker_full",
    "cookie_withheld",
]


class DeliveryError(Exception):
    """Why a batch was given up; passed to the ``on_error`` hook, never raised at callers.

    ``reason`` is the key it is counted under in ``client.stats.dropped``: ``queue_full``,
    ``queue_bytes_full``, ``spool_full`` (past ``max_spool_bytes``), ``rejected`` (a 4xx),
    ``retries_exhausted``, ``shutdown`` or ``error`` (something unexpected; the detail says what).
    (A :data:`DropReason`, as are the trackers' own ``tracker_full`` and ``cookie_withheld``.)
    """

    def __init__(self, reason: DropReason, detail: str = "", status: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.status = status


ErrorHook = Callable[[Batch, DeliveryError], None]


@dataclass
class Stats:
    """Counters since the client started (or since fork, in a child process).

    Batches are what the sender posts (one person or account, up to 30 items of each type).
    ``enqueued`` counts batches accepted for delivery; each then ends up ``delivered`` or in
    ``dropped`` (by reason), or is still ``queued`` (waiting, in flight or between retries).
    Batches refused at hand-over (``queue_full``, ``queue_bytes_full``, ``shutdown``) are
    in ``dropped`` only.

    With a spool (``spool_dir``): ``spooled`` counts batches written to this process's spool
    file, ``recovered`` those adopted from the spool files of processes that are gone (each
    then ends up delivered, dropped or queued like the others); ``queued`` includes batches
    waiting on disk only (adopted, or retried at the spool's slow cadence).
    """

    enqueued: int = 0
    delivered: int = 0
    retried: int = 0
    dry_run: int = 0
    events_delivered: int = 0
    dropped: dict[DropReason, int] = field(default_factory=dict)
    events_dropped: dict[DropReason, int] = field(default_factory=dict)
    queued: int = 0
    spooled: int = 0
    recovered: int = 0

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


class Counters:
    """Thread-safe counters behind :class:`Stats`, with rate-limited drop warnings.

    The first drop of a reason is logged at once, with its detail; later ones are added up
    and logged at most once every ``WARN_EVERY`` seconds per reason (and at shutdown).
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
            self._stats.events_delivered += batch.event_count

    def dropped(self, reason: DropReason, batches: int, events: int, detail: str = "") -> None:
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
                s.enqueued,
                s.delivered,
                s.retried,
                s.dry_run,
                s.events_delivered,
                dict(s.dropped),
                dict(s.events_dropped),
                queued,
                s.spooled,
                s.recovered,
            )


def excerpt(text: str, batch: Batch) -> str:
    """At most ``EXCERPT_CHARS`` of Koala's answer ``text``, safe for the host's logs.

    A Koala (or a proxy in front of it) that echoes the request would otherwise put the
    visitor's email, ids and IP in error logs: every string value of the batch's body is
    replaced (quoted, or bare when 8 characters or more), and so is anything shaped like an
    email or an IPv4 address, before cutting.
    """
    try:
        values = set(_strings(json.loads(batch.body)))
    except ValueError:  # not JSON after all: the patterns below still apply
        values = set()
    for value in sorted(values, key=len, reverse=True):
        # Quoted, as an echo of the JSON shows it; bare too when long enough not to be a
        # piece of a word (short values like "pro" would garble "profile_id").
        text = text.replace(json.dumps(value), '"' + REDACTED + '"')
        if len(value) >= 8:
            text = text.replace(value, REDACTED)
    text = _IPV4.sub(REDACTED, _EMAIL.sub(REDACTED, text))
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


def _strings(value: Any) -> Iterator[str]:
    """Every string value (not key) in decoded JSON."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


#: Drops that are the rules working, not a fault: logged at DEBUG (still counted).
QUIET_REASONS = frozenset({"cookie_withheld"})


def _log(reason: str, message: str, args: tuple[object, ...]) -> None:
    # A 4xx means a bug or a wrong key: the host's developers must see it.
    level = logging.ERROR if reason == "rejected" else logging.DEBUG if reason in QUIET_REASONS else logging.WARNING
    logger.log(level, message, *args)
