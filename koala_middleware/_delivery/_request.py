"""Each batch's HTTP request, built once, before any network call.

A local error while building (something in the batch no HTTP request can carry) is final
for that batch alone: it is counted as ``error`` and never retried, so it can never look
like a Koala outage and pause the sender for everyone. Retries post the same request.

The visitor's ``User-Agent`` goes out as received: WSGI and ASGI hand header values over as
latin-1 text (one character per byte), so encoding them back as latin-1 gives the bytes the
visitor sent. Bytes above 0x7F are legal in an HTTP field value (``obs-text``); when they
form valid UTF-8 (what browsers and apps send) the header carries them unchanged. Bytes that
are not valid UTF-8, and control characters (which HTTP forbids), are sent ``%XX``-escaped,
so the header stays valid UTF-8 for Koala to read. Text given to ``tracker(user_agent=...)``
with characters above U+00FF is sent as UTF-8.
"""

from __future__ import annotations

import re

from .._protocol import Batch

DETAIL_UNBUILDABLE = "no HTTP request can carry this batch, not retried: %s: %s"

#: Control characters HTTP forbids in a field value (tab is allowed).
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class Request:
    """A batch's POST: full URL, headers and body, ready for any HTTP layer."""

    __slots__ = ("batch", "body", "failed_at", "headers", "own_failures", "suspect", "url")

    def __init__(self, batch: Batch, url: str, headers: dict[str, str]) -> None:
        self.batch = batch
        self.url = url
        self.headers = headers
        self.body = batch.body
        #: When its first attempt failed (``time.monotonic()``), 0.0 before: for ``retry_for``.
        self.failed_at = 0.0
        #: Its last failure was its own (Koala took the others): see ``_policy.Health``.
        self.suspect = False
        #: How many of its failures were its own: its own backoff and ``max_retries`` count
        #: these (``batch.attempts`` counts Koala's outages too).
        self.own_failures = 0


def build(base_url: str, batch: Batch) -> Request:
    """The request for ``batch``; raises (only) for a batch no request can carry."""
    if not batch.path.startswith("/") or _FORBIDDEN.search(batch.path) or " " in batch.path:
        raise ValueError(f"a batch path must be an absolute URL path, got {batch.path!r}")
    if not isinstance(batch.body, bytes):
        raise TypeError(f"a batch body must be bytes, got {type(batch.body).__name__}")
    headers = {"Content-Type": "application/json", "User-Agent": header_text(batch.user_agent)}
    return Request(batch, base_url + batch.path, headers)


def header_text(value: str) -> str:
    """``value`` as a header's text, whose UTF-8 encoding is what goes on the wire."""
    if value.isascii() and value.isprintable():  # nearly every User-Agent: nothing to do
        return value
    try:
        raw = value.encode("latin-1")  # from WSGI/ASGI: the bytes as received
    except UnicodeEncodeError:
        raw = value.encode("utf-8")  # from a developer: text beyond latin-1
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = "".join(chr(byte) if byte < 0x80 else f"%{byte:02X}" for byte in raw)
    return _FORBIDDEN.sub(lambda match: f"%{ord(match[0]):02X}", text)
