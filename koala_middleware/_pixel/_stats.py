"""The proxy's counters, and its log lines: one per kind of trouble per interval, so an
upstream outage is said once a minute, not once a request."""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["PixelStats", "describe"]

logger = logging.getLogger("koala_middleware")

LOG_INTERVAL = 60.0

#: What each counter means, for the log line that goes with it.
REASONS = {
    "upstream_unreachable": "pixel proxy: the upstream could not be reached (%s); answered 502",
    "upstream_timeout": "pixel proxy: the upstream did not answer in time (%s); answered 504",
    "upstream_cut": "pixel proxy: the upstream answer broke off or ran past its deadline (%s)",
    "rejected": "pixel proxy: refused a request (%s)",
    "too_large": "pixel proxy: a request body over pixel_max_body (%s); answered 413",
    "websocket_failed": "pixel proxy: a WebSocket could not be relayed (%s)",
    "proxy_error": "pixel proxy: unexpected error (%s); answered 502 (please report it)",
}


class PixelStats:
    """Counts of what the proxy did (``proxied``, ``cache_hits``) and of each failure kind
    (the keys of ``REASONS``); thread-safe, cheap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1

    def failed(self, kind: str, detail: str, exc: BaseException | None = None) -> None:
        """Count a failure of ``kind`` and log it, unless one of its kind was logged within
        the last minute (the count says how many there were)."""
        now = time.monotonic()
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            last = self._logged_at.get(kind)
            if last is not None and now - last < LOG_INTERVAL:
                return
            self._logged_at[kind] = now
            total = self.counts[kind]
        logger.warning(REASONS[kind] + " [%d so far; logged at most once a minute]", detail, total, exc_info=exc)

    def __repr__(self) -> str:
        return f"<PixelStats {self.counts}>"


def describe(exc: BaseException) -> str:
    """What a log line says of ``exc``: its type, and its message when it has one."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
