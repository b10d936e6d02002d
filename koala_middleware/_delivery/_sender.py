"""What both delivery modes share: accounting, the ``on_error`` hook, retry verdicts, and
the fork hooks that keep each sender usable in a forked child.

After ``os.fork()`` the child starts with fresh state: the parent's locks, threads and
connections are not usable there (gunicorn ``--preload``, uWSGI, Celery prefork), and the
parent still delivers what it had queued.
"""

from __future__ import annotations

import logging
import os
import weakref

from .._protocol import Batch
from ._policy import Answer, Health, classify
from ._settings import DeliverySettings
from ._stats import LOG_REJECTED, Counters, DeliveryError, ErrorHook, excerpt

logger = logging.getLogger("koala_middleware")

LOG_RETRY = "delivery failed (%s), attempt %d, next try in %.2fs"
LOG_UNAVAILABLE = (
    "Koala is failing (%s); pausing delivery for %.2fs, then probing one batch "
    "at a time (new batches queue up meanwhile, within the bounds)"
)
LOG_RECOVERED = "Koala answers again after %d failed attempt(s); resuming delivery"
LOG_HOOK_FAILED = "the on_error hook raised; ignoring it"


class Sender:
    """Shared skeleton: accounting, hooks and the retry verdicts for both delivery modes."""

    def __init__(self, settings: DeliverySettings, on_error: ErrorHook | None) -> None:
        self.settings = settings
        self.on_error = on_error
        self.counters = Counters()
        self._health = Health()
        _live_senders.add(self)

    def _give_up(self, batch: Batch, error: DeliveryError) -> None:
        self.counters.dropped(error.reason, 1, batch.event_count, error.detail)
        if self.on_error is not None:
            try:
                self.on_error(batch, error)
            except Exception:
                logger.exception(LOG_HOOK_FAILED)

    def _outcome(self, batch: Batch, answer: Answer | None, exc: BaseException | None, probe: bool) -> float | None:
        """Account for one attempt; the pause before retrying, or None when the batch is done."""
        verdict, detail, retry_after = classify(answer, exc)
        if verdict != "retry":
            failures = self._health.answered()
            if failures:
                logger.info(LOG_RECOVERED, failures)
            if verdict == "ok":
                self.counters.delivered(batch)
            else:
                assert answer is not None
                detail = LOG_REJECTED % (answer.status, excerpt(detail, batch))
                self._give_up(batch, DeliveryError("rejected", detail, answer.status))
            return None
        delay, first = self._health.failed(self.settings, probe, retry_after)
        if first:
            logger.warning(LOG_UNAVAILABLE, detail, delay)
        batch.attempts += 1
        if batch.attempts > self.settings.max_retries:
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
        self._health = Health()

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
