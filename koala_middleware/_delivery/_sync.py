"""``sync=True``: each batch is sent in the caller's thread before the hand-over returns."""

from __future__ import annotations

import math
import threading
import time

import httpx

from .._protocol import Batch
from ._http import BODY_CAP, answer
from ._policy import DOWN, Answer
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
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                transport = self.settings.transport
                # trust_env (the default): the same proxy environment and trust store as the
                # background sender; proxy= overrides the environment there too.
                self._client = httpx.Client(
                    timeout=self.settings.timeout,
                    transport=transport if isinstance(transport, httpx.BaseTransport) else None,
                    proxy=self.settings.proxy,
                )
            return self._client

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
        headers = [(name.encode(), value.encode()) for name, value in request.headers.items()]
        while True:
            answer = exc = None
            try:
                answer = self._post(request.url, request.body, headers, deadline)
            except (httpx.HTTPError, TimeoutError) as error:
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

    def _post(self, url: str, body: bytes, headers: list[tuple[bytes, bytes]], deadline: float) -> Answer:
        """One attempt, within ``deadline``: httpx's timeouts are per read, so a body that
        trickles in is cut off here, between reads; at most ``BODY_CAP`` bytes are read."""
        timeout = max(deadline - time.monotonic(), 0.01)
        with self._http().stream("POST", url, content=body, headers=headers, timeout=timeout) as response:
            received = b""
            assert isinstance(response.stream, httpx.SyncByteStream)
            for chunk in response.stream:  # the stream itself: a MockTransport's answer counts as read
                received += chunk
                if len(received) >= BODY_CAP:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no whole answer within {self.settings.timeout:g}s")
            return answer(response, received)

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
