"""The sender's configuration: the ``KoalaClient`` options of the same names."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

#: The proxies the delivery engines can talk to.
PROXY_SCHEMES = ("http://", "https://")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliverySettings:
    """How the sender talks to Koala: the ``KoalaClient`` options of the same names (whose
    signature holds the defaults, so they are written once)."""

    base_url: str
    timeout: float
    max_queue_batches: int
    max_queue_bytes: int
    max_in_flight: int
    max_retries: int
    backoff_base: float
    max_backoff: float
    retry_for: float
    proxy: str | None
    spool_dir: str | None
    max_spool_bytes: int

    def __post_init__(self) -> None:
        # At the call site, saying how to fix it: a bad proxy= would fail every batch later.
        if self.proxy is not None and (not self.proxy.startswith(PROXY_SCHEMES) or not urlsplit(self.proxy).hostname):
            raise ValueError(
                f"proxy must be an http:// or https:// URL such as 'http://proxy.internal:3128', got {self.proxy!r}"
            )
