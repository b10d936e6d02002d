"""CDN scripts (``sdk.js`` and its chunks) kept in memory for the upstream's ``max-age``,
capped, so that a page view does not always cost a round trip to Koala's CDN."""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["CachedAnswer", "ScriptCache"]

MAX_ENTRIES = 32
MAX_ENTRY_BYTES = 4 * 1024 * 1024

_MAX_AGE = re.compile(r"(?:^|[,\s])(?:s-)?max-age\s*=\s*(\d+)", re.IGNORECASE)
_NOT_SHARED = re.compile(r"no-store|no-cache|private", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    expires: float


class ScriptCache:
    """A small LRU of whole answers, keyed by URL and the request's ``Accept-Encoding`` (the
    body is kept as the CDN sent it, compressed or not); thread-safe."""

    def __init__(self, max_seconds: float) -> None:
        self._max_seconds = max_seconds
        self._entries: OrderedDict[tuple[str, str], CachedAnswer] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, url: str, accept_encoding: str) -> CachedAnswer | None:
        key = (url, accept_encoding)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.expires <= time.monotonic():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry

    def seconds_for(self, status: int, headers: list[tuple[str, str]]) -> float:
        """How long this answer may be kept: 0 unless a 200 with a shared ``max-age``, no
        cookie and no ``Vary`` beyond ``Accept-Encoding``."""
        if self._max_seconds <= 0 or status != 200:
            return 0.0
        max_age = None
        for name, value in headers:
            lower = name.lower()
            if lower == "set-cookie":
                return 0.0
            if lower == "vary" and any(v.strip().lower() not in ("accept-encoding", "") for v in value.split(",")):
                return 0.0
            if lower == "cache-control":
                if _NOT_SHARED.search(value):
                    return 0.0
                found = _MAX_AGE.search(value)
                if found:
                    max_age = int(found.group(1))
        return float(min(max_age, self._max_seconds)) if max_age else 0.0

    def put(self, url: str, accept_encoding: str, answer: CachedAnswer) -> None:
        with self._lock:
            self._entries[(url, accept_encoding)] = answer
            self._entries.move_to_end((url, accept_encoding))
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)
