"""When to retry, and how long to wait: verdicts, backoff, ``Retry-After``, Koala's health.

Failures follow the docs' advice: network errors, timeouts, 408, 429 and 5xx are retried,
other 4xx are final. When an attempt fails, the whole sender stops sending and waits out a
capped exponential backoff with jitter (at least ``Retry-After``, within the cap); then one
batch at a time goes out as a probe until one gets an answer. So an outage costs one request
per backoff period, not one per queued batch, and the first answer reopens full concurrency.
"""

from __future__ import annotations

import datetime
import email.utils
import random
import time
from typing import NamedTuple

from . import _native
from ._settings import DeliverySettings


class Answer(NamedTuple):
    """What the sender keeps of Koala's answer to one attempt (whatever HTTP layer got it)."""

    status: int
    retry_after: str | None = None
    #: The start of the body (at most the HTTP layer's cap), decoded leniently.
    text: str = ""


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


def classify(answer: Answer | None, exc: BaseException | None) -> tuple[str, str, float | None]:
    """``("ok"|"retry"|"reject", detail, retry_after)`` for one attempt's outcome.

    A rejection's detail is Koala's answer text as received: the sender redacts it (see
    ``_stats.excerpt``) before it reaches a log or a hook.
    """
    if exc is not None:
        text = str(exc)
        return "retry", f"{type(exc).__name__}: {text}" if text else type(exc).__name__, None
    assert answer is not None
    status = answer.status
    if 200 <= status < 300:
        return "ok", "", None
    if status in (408, 429) or status >= 500:
        return "retry", f"HTTP {status}", parse_retry_after(answer.retry_after)
    return "reject", answer.text, None


class Health:
    """Koala as the sender sees it: failures in a row, and no new attempt before ``gate``.

    Only a probe's failure (or the first failure) raises the level: the batches that were
    already in flight when Koala went away all fail at once, and that is one failure.

    ``Retry-After`` is Koala's own word, so it is kept apart, as ``hold``: no request starts
    before it (within ``max_backoff``), even if requests that were already in flight
    succeed meanwhile; those end the backoff, not the hold.
    """

    __slots__ = ("_lock", "failures", "gate", "hold")

    def __init__(self) -> None:
        self.failures = 0
        self.gate = 0.0
        self.hold = 0.0
        self._lock = _native.Lock()

    def failed(self, settings: DeliverySettings, probe: bool, retry_after: float | None) -> tuple[float, bool]:
        """Record a failure; (seconds until the next attempt, whether it is the first)."""
        with self._lock:
            first = not self.failures
            if probe or first:
                self.failures += 1
            delay = backoff(settings, self.failures, retry_after)
            now = time.monotonic()
            self.gate = max(self.gate, now + delay)
            if retry_after is not None:
                self.hold = max(self.hold, now + min(retry_after, settings.max_backoff))
            return max(self.gate - now, 0.0), first

    def held(self) -> float:
        """Seconds left of a ``Retry-After`` pause (0 when none)."""
        hold = self.hold
        return max(hold - time.monotonic(), 0.0) if hold else 0.0

    def answered(self) -> int:
        """Koala answered (2xx or a final 4xx): reopen; returns the failures it ends."""
        if not self.failures:  # the usual case, once per delivered batch: no lock needed
            return 0
        with self._lock:
            failures, self.failures, self.gate = self.failures, 0, 0.0
            return failures
