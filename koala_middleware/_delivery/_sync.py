"""``sync=True``: each batch is sent in the caller's thread before the hand-over returns."""

from __future__ import annotations

import threading
import time

import httpx

from .._protocol import Batch
from ._sender import Sender
from ._settings import DeliverySettings
from ._stats import DeliveryError, ErrorHook


class SyncSender(Sender):
    """``sync=True``: deliver in the caller's thread, for serverless and scripts.

    Background threads are frozen between invocations there, so a batch must be sent
    before the response finishes. Retries follow the same rules, but one batch takes at most
    ``timeout`` seconds in all, attempts and pauses included; and while Koala keeps failing
    the shared backoff soon exceeds that budget, so each batch gets one attempt, not many.
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
                self._client = httpx.Client(
                    timeout=self.settings.timeout,
                    transport=transport if isinstance(transport, httpx.BaseTransport) else None,
                )
            return self._client

    def submit(self, batch: Batch) -> bool:
        self.counters.add("enqueued")
        try:
            self._send(batch)
        except Exception as error:  # never into the host's request
            self._give_up(batch, DeliveryError("error", f"{type(error).__name__}: {error}"))
        return True

    def _send(self, batch: Batch) -> None:
        deadline = time.monotonic() + self.settings.timeout
        url = self.settings.base_url + batch.path
        headers = {"Content-Type": "application/json", "User-Agent": batch.user_agent}
        while True:
            remaining = deadline - time.monotonic()
            response = exc = None
            try:
                response = self._http().post(url, content=batch.body, headers=headers, timeout=max(remaining, 0.01))
            except httpx.HTTPError as error:
                exc = error
            delay = self._outcome(batch, response, exc, probe=True)
            if delay is None:
                return
            if time.monotonic() + delay >= deadline:
                self._give_up(batch, DeliveryError(
                    "retries_exhausted", f"sync budget of {self.settings.timeout:g}s spent after "
                    f"{batch.attempts} attempt(s)", response.status_code if response is not None else None,
                ))
                return
            self.counters.add("retried")
            time.sleep(delay)

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
