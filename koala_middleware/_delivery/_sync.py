"""``sync=True``: each batch is sent in the caller's thread before the hand-over returns."""

from __future__ import annotations

import math
import threading
import time

from .._protocol import Batch
from ._engine import BlockingEngine, blocking_engine, encode_headers
from ._policy import DOWN
from ._request import DETAIL_UNBUILDABLE, Request, build
from ._sender import Sender
from ._settings import DeliverySettings
from ._stats import DeliveryError, ErrorHook


class SyncSender(Sender):
    """``sync=True``: deliver in the caller's thread, for serverless and scripts.

    Background threads are frozen between invocations there, so a batch must be sent
    before the response finishes. Retries follow the same rules, but one batch takes at most
    ``timeout`` seconds in all, attempts and pauses included (``retry_for`` does not apply);
    and while Koala is down (failing for different batches, nothing getting through) each
    batch gets one attempt, not many.
    Nothing raises into the caller: what cannot be sent is counted and passed to
    ``on_error``.
    """

    def __init__(self, settings: DeliverySettings, on_error: ErrorHook | None) -> None:
        super().__init__(settings, on_error)
        self._engine: BlockingEngine | None = None
        # One exchange at a time on the engine's kept-alive connection: threads that send
        # at once take turns (each within its own deadline).
        self._lock = threading.Lock()

    def submit(self, batch: Batch) -> bool:
        self.counters.add("enqueued")
        try:
            request = build(self.settings.base_url, batch)
        except Exception as error:  # this batch alone: Koala is not to blame, nothing to retry
            self._give_up(batch, DeliveryError("error", DETAIL_UNBUILDABLE % (type(error).__name__, error)))
            return True
        try:
            self._send(request)
        except Exception as error:  # never into the host's request
            self._give_up(batch, DeliveryError("error", f"{type(error).__name__}: {error}"))
        return True

    def _send(self, request: Request) -> None:
        batch = request.batch
        deadline = time.monotonic() + self.settings.timeout
        request.failed_at = -math.inf  # its time budget is ``timeout``: no retry_for here
        headers = encode_headers(request)
        while True:
            answer = exc = None
            try:
                with self._lock:
                    if self._engine is None:
                        self._engine = blocking_engine(self.settings)
                    answer = self._engine.send("POST", request.url, headers, request.body, deadline)
            except Exception as error:  # network, TLS, proxy, protocol, timeout: as the background sender
                exc = error
            delay = self._outcome(request, answer, exc, probe=True)
            if delay is None:
                return
            delay = max(delay, self._health.held())
            # While Koala is down, waiting for it would only hold the caller's request: one
            # attempt per batch (each next batch is the probe).
            if self._health.state == DOWN or time.monotonic() + delay >= deadline:
                why = (
                    "Koala is down"
                    if self._health.state == DOWN
                    else f"sync budget of {self.settings.timeout:g}s spent"
                )
                self._give_up(
                    batch,
                    DeliveryError(
                        "retries_exhausted",
                        f"{why} after {batch.attempts} attempt(s)",
                        answer.status if answer is not None else None,
                    ),
                )
                return
            self.counters.add("retried")
            time.sleep(delay)

    def pending(self) -> int:
        return 0

    def flush(self, timeout: float) -> bool:
        return True

    def shutdown(self, timeout: float) -> bool:
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        self.counters.report()
        return True

    def after_fork(self) -> None:
        super().after_fork()
        self._engine = None  # the parent's connection: dropped, not closed (a TLS close would write)
        self._lock = threading.Lock()
