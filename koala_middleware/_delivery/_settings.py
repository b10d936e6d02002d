"""The sender's configuration: the ``KoalaClient`` options of the same names."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

#: The proxies the sender can talk to (aiohttp has no SOCKS).
PROXY_SCHEMES = ("http://", "https://")


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
        # At the call site, saying how to fix it: a bad proxy= would fail every batch later.
        if self.proxy is not None and (not self.proxy.startswith(PROXY_SCHEMES) or not urlsplit(self.proxy).hostname):
            raise ValueError(
                f"proxy must be an http:// or https:// URL such as 'http://proxy.internal:3128', got {self.proxy!r}"
            )
