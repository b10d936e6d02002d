"""When to retry, and how long to wait: verdicts, backoff, ``Retry-After``, Koala's health.

Failures follow the docs' advice: network errors, timeouts, 408, 429 and 5xx are retried,
other 4xx are final. Three cases are told apart, from the outcomes of the last attempts
(a sliding window: the last ``WINDOW_SECONDS``, at most one round of ``max_in_flight``):

- **This batch is bad**: Koala accepts the others (at least ``HEALTHY_SHARE`` of the window
  succeeds, or only this batch failed). The batch waits on its own capped exponential
  backoff with jitter and is given up after ``max_retries`` failures of its own (those
  while Koala failed for everyone do not count); no one else waits.
- **Koala is degraded**: failures across different batches, some successes. Failed batches
  come back after the first backoff step (at most ``PROBE_EVERY_MAX``), without spending
  their attempts budget, and the sender keeps in flight, and starts per ``PACE_SECONDS``, a share
  of ``max_in_flight`` equal to the share of attempts answered: the half that works at 50%,
  more as answers succeed (so after an outage it ramps up like a slow start).
- **Koala is down**: no success in the window, from different batches or a connection error.
  One batch at a time goes out as a probe, every ``PROBE_EVERY_MAX`` seconds at most (sooner
  at first), so no pause outlives the outage by more than that; the first answer reopens.

``Retry-After`` is Koala's word: no attempt starts before it (within ``max_backoff``). While
Koala as a whole fails, a batch is given up only once ``retry_for`` seconds have passed
since its first failure *and* it failed ``max_retries`` times: a brownout of a few minutes
drops nothing while the queue has room (its bounds are the only protection of memory).
"""

from __future__ import annotations

import collections
import datetime
import email.utils
import math
import random
import time
from typing import NamedTuple

from . import _native
from ._settings import DeliverySettings

#: The outcomes the health verdict reads: those of the last ``WINDOW_SECONDS``, at most
#: ``max_in_flight`` within 10-``WINDOW_SIZE`` (enough to tell 5% from 50% failing; one
#: deque append per attempt).
WINDOW_SECONDS = 10.0
WINDOW_SIZE = 100
#: While degraded, attempts start at most ``max_in_flight`` x the share answered per this
#: many seconds: the pace ``max_in_flight`` is sized for (a Koala answering in 50 ms).
PACE_SECONDS = 0.05
#: At least this share of successes in the window: Koala is healthy, failures are the
#: failing batches' own problem.
HEALTHY_SHARE = 0.8
#: The longest pause between probes while Koala is down, and the longest backoff of a batch
#: that failed while Koala failed for everyone: how long a pause may outlive an outage.
PROBE_EVERY_MAX = 1.5

HEALTHY, DEGRADED, DOWN = "healthy", "degraded", "down"


class Answer(NamedTuple):
    """What the sender keeps of Koala's answer to one attempt (whatever HTTP layer got it)."""

    status: int
    retry_after: str | None = None
    #: The start of the body (at most the HTTP layer's cap), decoded leniently.
    text: str = ""


def backoff(
    settings: DeliverySettings, failures: int, retry_after: float | None = None, cap: float | None = None
) -> float:
    """The pause after ``failures`` failures in a row: capped exponential, with jitter.

    Half the step is fixed and half random, so many processes that lost Koala together do
    not come back in lockstep. ``cap`` (within ``max_backoff``) caps the step; ``Retry-After``
    is a floor; ``max_backoff`` caps everything.
    """
    step = settings.backoff_base * 2.0 ** min(max(failures - 1, 0), 60)
    ceiling = min(settings.max_backoff, step if cap is None else min(step, cap))
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


class Verdict(NamedTuple):
    """What the health verdict says about one failed attempt."""

    #: Seconds the batch waits before its next attempt.
    delay: float
    #: True when Koala accepts other batches: the failure is the batch's own problem, and
    #: counts against ``max_retries`` alone.
    own: bool
    #: True for the failure that turns a healthy Koala into a failing one (log it, once).
    first: bool


class Health:
    """Koala as the sender sees it, from the outcomes of the last attempts.

    ``admit()`` says whether one more attempt may start now; ``failed()`` and ``answered()``
    record outcomes. Only a probe's failure lengthens the pause between probes: the batches
    that were in flight when Koala went away all fail at once, and that is one failure.
    ``hold`` is a ``Retry-After`` pause: no attempt starts before it.
    """

    __slots__ = ("_failing", "_failures", "_lock", "_next", "_size", "_window", "failures", "gate", "hold", "state")

    def __init__(self, max_in_flight: int = WINDOW_SIZE) -> None:
        #: (when, batch key, or 0 for an answer): the last attempts' outcomes, newest last.
        #: As many as one round of attempts in flight (within 10-``WINDOW_SIZE``), so that
        #: the batches in flight when Koala went away fill it.
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._size = min(max(max_in_flight, 10), WINDOW_SIZE)
        #: Failures in the window per batch key (how many different batches fail), in all.
        self._failing: dict[int, int] = {}
        self._failures = 0
        self.state = HEALTHY
        #: Failed probes in a row while down, and no probe before ``gate``.
        self.failures = 0
        self.gate = 0.0
        self.hold = 0.0
        #: While degraded, no attempt starts before this (the pace, see ``admit``).
        self._next = 0.0
        self._lock = _native.Lock()

    def _record(self, now: float, key: int) -> None:
        window, failing = self._window, self._failing
        window.append((now, key))
        if key:
            failing[key] = failing.get(key, 0) + 1
            self._failures += 1
        horizon = now - WINDOW_SECONDS
        while len(window) > self._size or window[0][0] < horizon:
            _, old = window.popleft()
            if old:
                self._failures -= 1
                left = failing[old] - 1
                if left:
                    failing[old] = left
                else:
                    del failing[old]

    def share_ok(self) -> float:
        """The share of attempts in the window that got an answer (1.0 when empty)."""
        window = self._window
        return 1.0 - self._failures / len(window) if window else 1.0

    def _verdict(self, unanswered: bool) -> str:
        """The state the window shows after a failure (``unanswered``: no answer came)."""
        share = self.share_ok()
        if share >= HEALTHY_SHARE or (len(self._failing) < 2 and not unanswered):
            return HEALTHY  # Koala takes the others: this batch's own problem
        return DEGRADED if share > 0 else DOWN

    def failed(
        self,
        settings: DeliverySettings,
        key: int,
        attempts: int,
        probe: bool,
        retry_after: float | None,
        unanswered: bool,
        suspect: bool = False,
        own_failures: int = 0,
    ) -> Verdict:
        """Record a failed attempt of batch ``key`` (its ``attempts``-th); what follows.

        A ``suspect`` batch (its last failure was its own) is not evidence about Koala: left
        out of the window, so that batches Koala keeps refusing, retried, cannot add up to
        a brownout that would slow everyone (and spare themselves their attempts budget).
        ``own_failures`` of its earlier failures were its own: only those lengthen its own
        backoff (a batch that waited out outages must not wait 16 s when the first
        failures of the next one look like its own).
        """
        with self._lock:
            now = time.monotonic()
            if not suspect:
                self._record(now, key)
            was = self.state
            state = self.state = self._verdict(unanswered)
            if retry_after is not None:
                self.hold = max(self.hold, now + min(retry_after, settings.max_backoff))
            if state == DOWN and (was != DOWN or probe):
                self.failures += 1
                self.gate = now + backoff(settings, self.failures, retry_after, PROBE_EVERY_MAX)
            own = state == HEALTHY
            if own:  # its own exponential backoff, up to max_backoff
                delay = backoff(settings, own_failures + 1, retry_after)
            else:  # not its fault: the first step, the pace (or the probes) slow everyone down
                delay = backoff(settings, 1 if state == DEGRADED else attempts, retry_after, PROBE_EVERY_MAX)
            return Verdict(delay, own, was == HEALTHY and state != HEALTHY)

    def answered(self) -> bool:
        """Koala answered (2xx or a final 4xx); True when that ends an outage or a brownout."""
        with self._lock:
            self._record(time.monotonic(), 0)
            was = self.state
            if was == HEALTHY and not self._failures:  # the usual case
                return False
            healthy = self.share_ok() >= HEALTHY_SHARE or len(self._failing) < 2
            self.state = HEALTHY if healthy else DEGRADED
            self.failures, self.gate = 0, 0.0
            return was == DOWN or (was != HEALTHY and healthy)

    def admit(self, in_flight: int, max_in_flight: int, now: float | None = None) -> tuple[bool, float | None]:
        """Whether one more attempt may start now; if not, seconds until one may (None:
        when an attempt in flight ends).

        Healthy: up to ``max_in_flight`` in flight. Degraded: the share of attempts answered
        of that, and as many starts per ``PACE_SECONDS`` (what ``max_in_flight`` allows
        against a Koala answering in that time), so fast failures cannot spin. Down: one
        probe at a time, once ``gate`` has passed.
        """
        state = self.state
        if state == HEALTHY:
            return in_flight < max_in_flight, None
        if now is None:
            now = time.monotonic()
        if state == DOWN:
            if in_flight:
                return False, None
            wait = self.gate - now
            return (True, None) if wait <= 0 else (False, wait)
        allowed = max(1, math.ceil(max_in_flight * self.share_ok()))
        if in_flight >= allowed:
            return False, None
        if now < self._next:
            return False, self._next - now
        self._next = max(self._next, now - PACE_SECONDS) + PACE_SECONDS / allowed
        return True, None

    def held(self) -> float:
        """Seconds left of a ``Retry-After`` pause (0 when none)."""
        hold = self.hold
        return max(hold - time.monotonic(), 0.0) if hold else 0.0
