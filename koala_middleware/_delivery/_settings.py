"""The sender's configuration: the ``KoalaClient`` options of the same names."""

from __future__ import annotations

from dataclasses import dataclass

import httpx


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How the sender talks to Koala; the ``KoalaClient`` options of the same names."""

    base_url: str
    timeout: float = 5.0
    max_queue_batches: int = 10_000
    max_queue_bytes: int = 32 * 1024 * 1024
    max_in_flight: int = 100
    connections_per_pool: int = 5
    max_retries: int = 8
    backoff_base: float = 0.5
    max_backoff: float = 30.0
    transport: httpx.AsyncBaseTransport | httpx.BaseTransport | None = None
    proxy: str | None = None
    spool_dir: str | None = None
    max_spool_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.proxy is not None:
            from ._http import check_proxy

            check_proxy(self.proxy)
