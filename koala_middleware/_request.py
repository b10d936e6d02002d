"""A framework-neutral view of the incoming request: only what Koala's rules need.

Both middlewares fill one of these from their protocol (``environ`` or ``scope``); every
rule after that (cookie, privacy, tracker) reads this, so it is written once for both.
Everything here comes from the network and is untrusted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class RequestInfo:
    """What the cookie, privacy and tracker rules see of a request.

    Passed to your ``should_track(info)`` callback. ``raw`` is the WSGI ``environ`` or the
    ASGI ``scope``, for decisions that need more (read it, do not change it).
    The middlewares build one per request, passing the fields in order (cheaper than by name).
    """

    __slots__ = ("cookie_headers", "gpc", "host", "ip", "method", "path", "raw", "scheme", "user_agent")

    def __init__(
        self,
        method: str,
        scheme: str,
        host: str | None,
        path: str,
        cookie_headers: list[str],
        user_agent: str | None,
        ip: str | None,
        gpc: bool,
        raw: Any,
    ) -> None:
        self.method = method
        self.scheme = scheme
        self.host = host
        self.path = path
        self.cookie_headers = cookie_headers
        self.user_agent = user_agent
        self.ip = ip
        #: The visitor's browser sent ``Sec-GPC: 1`` (Global Privacy Control).
        self.gpc = gpc
        self.raw = raw

    @property
    def https(self) -> bool:
        return self.scheme in ("https", "wss")

    def __repr__(self) -> str:
        return f"<RequestInfo {self.method} {self.scheme}://{self.host}{self.path}>"


@dataclass(frozen=True, slots=True)
class RequestReader:
    """How one protocol's request object (``environ`` or ``scope``) gives up what the rules
    need, each part read only when needed: most requests need the cookie alone.

    :param info: the whole :class:`RequestInfo`, for ``should_track`` callbacks.
    :param path: the path, for ``exclude_paths``.
    :param site: ``(host, https)``, to scope a new visitor's cookie.
    :param visitor: ``(user_agent, ip)``, for the batch of a tracker that recorded something.
    """

    info: Callable[[Any], RequestInfo]
    path: Callable[[Any], str]
    site: Callable[[Any], tuple[str | None, bool]]
    visitor: Callable[[Any], tuple[str | None, str | None]]


# -- reading what servers put in environ / scope -------------------------------------------------
# PEP 3333 and the ASGI spec say which types each value has; servers, test clients and other
# middleware sometimes hand over others (bytes, lists, None). These turn any of them into the
# type the rules need, or None, never raising: a request is never failed over tracking.


def header_text(value: object) -> str | None:
    """A header value as text: ``str`` as it is, ``bytes`` as latin-1 (as HTTP has it),
    several values (a list) joined with ``"; "``; anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    if isinstance(value, (list, tuple)):
        parts = [part for part in map(header_text, value) if part]
        return "; ".join(parts) if parts else None
    return None


def sec_gpc(value: str | bytes) -> bool:
    """Whether a ``Sec-GPC`` header value says ``1`` (the only value the spec defines).

    Spaces around it are allowed, and ``"1,1"``, several headers joined with commas by the
    server, is one. A value that is not ``1`` is no opt-out.
    """
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return any(part.strip(" \t") == "1" for part in text.split(","))


_UNSEEN: Any = object()
#: Addresses already judged (the batch path reads one per request that recorded something):
#: a dict lookup costs a tenth of parsing. Bounded: behind a proxy fixer the address
#: comes from a client-controlled header.
_judged_ips: dict[str, str | None] = {}


def client_ip(value: object) -> str | None:
    """``value`` when it is an IPv4 or IPv6 address, as written; otherwise None (a unix
    socket path, ``"testclient"``, bytes, a number): Koala matches companies by address,
    and a batch must never carry something else as one."""
    if value.__class__ is not str:
        return None
    judged = _judged_ips.get(value, _UNSEEN)
    if judged is _UNSEEN:
        judged = _judge_ip(value)
        if len(_judged_ips) >= 1024:
            _judged_ips.clear()
        _judged_ips[value] = judged
    return judged  # type: ignore[no-any-return]


def _judge_ip(value: str) -> str | None:
    if not 0 < len(value) <= 64:
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return None
    return value


def path_text(value: object) -> str:
    """A path as text: ``bytes`` decoded as UTF-8 (undecodable bytes replaced), anything
    but a non-empty str or bytes is ``"/"``."""
    if isinstance(value, str):
        return value or "/"
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace") or "/"
    return "/"
