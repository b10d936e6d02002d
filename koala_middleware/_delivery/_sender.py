"""What both delivery modes share: accounting, the ``on_error`` hook, retry verdicts, and
the fork hooks that keep each sender usable in a forked child.

After ``os.fork()`` the child starts with fresh state: the parent's locks, threads and
connections are not usable there (gunicorn ``--preload``, uWSGI, Celery prefork), and the
parent still delivers what it had queued.
"""

from __future__ import annotations

import logging
import os
import time
import weakref

from .._protocol import Batch
from ._policy import HEALTHY, Answer, Health, classify
from ._request import Request
from ._settings import DeliverySettings
from ._stats import LOG_REJECTED, Counters, DeliveryError, ErrorHook, excerpt

logger = logging.getLogger("koala_middleware")

LOG_RETRY = "delivery failed (%s), attempt %d, next try in %.2fs"
LOG_UNAVAILABLE = (
    "Koala is failing for several batches (%s); sending less while it lasts, probing one "
    "batch at a time if nothing gets through (new batches queue up meanwhile, within the bounds)"
)
LOG_RECOVERED = "Koala answers again; resuming delivery"
LOG_HOOK_FAILED = "the on_error hook raised; ignoring it"


class Sender:
    """Shared skeleton: accounting, hooks and the retry verdicts for both delivery modes."""

    def __init__(self, settings: DeliverySettings, on_error: ErrorHook | None) -> None:
        self.settings = settings
        self.on_error = on_error
        self.counters = Counters()
        self._health = Health(settings.max_in_flight)
        _live_senders.add(self)

    def _give_up(self, batch: Batch, error: DeliveryError) -> None:
        self.counters.dropped(error.reason, 1, batch.event_count, error.detail)
        if self.on_error is not None:
            try:
                self.on_error(batch, error)
            except BaseException:  # SystemExit too: the batch must still be finished, or flush waits forever
                logger.exception(LOG_HOOK_FAILED)

    def _recovered(self) -> None:
        """Koala answers again after an outage or a brownout (the background sender then
        sends the retries it scheduled at once)."""

    def _outcome(self, request: Request, answer: Answer | None, exc: BaseException | None, probe: bool) -> float | None:
        """Account for one attempt; the pause before retrying, or None when the batch is done."""
        batch = request.batch
        verdict, detail, retry_after = classify(answer, exc)
        if verdict != "retry":
            if self._health.answered():  # out of an outage, or a brownout
                if self._health.state == HEALTHY:
                    logger.info(LOG_RECOVERED)
                self._recovered()
            if verdict == "ok":
                self.counters.delivered(batch)
            else:
                assert answer is not None
                detail = LOG_REJECTED % (answer.status, excerpt(detail, batch))
                self._give_up(batch, DeliveryError("rejected", detail, answer.status))
            return None
        batch.attempts += 1
        settings = self.settings
        now = time.monotonic()
        request.failed_at = request.failed_at or now
        delay, own, first = self._health.failed(
            settings,
            id(batch),
            batch.attempts,
            probe,
            retry_after,
            answer is None,
            request.suspect,
            request.own_failures,
        )
        request.suspect = own
        if own:
            request.own_failures += 1
        if first:
            logger.warning(LOG_UNAVAILABLE, detail)
        # Koala takes the others: the attempts budget, counting the batch's own failures
        # alone; Koala fails for everyone: the time budget too, so that a brownout of a few
        # minutes gives nothing up.
        if (own and request.own_failures > settings.max_retries) or (
            batch.attempts > settings.max_retries and now - request.failed_at >= settings.retry_for
        ):
            status = answer.status if answer is not None else None
            self._give_up(
                batch, DeliveryError("retries_exhausted", f"{batch.attempts} attempts, last: {detail}", status)
            )
            return None
        logger.debug(LOG_RETRY, detail, batch.attempts, delay)
        return delay

    def after_fork(self) -> None:
        """In a forked child: forget the parent's state (never close its sockets)."""
        self.counters = Counters()
        self._health = Health(self.settings.max_in_flight)

    def park(self) -> bool:
        """Before a fork: hold the sender thread at a safe point; True if it is held."""
        return False

    def unpark(self) -> None:
        """After a fork, in the parent: let the sender thread go on."""


_live_senders: weakref.WeakSet[Sender] = weakref.WeakSet()
_parked: list[Sender] = []


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
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
