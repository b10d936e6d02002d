"""A framework-neutral view of the incoming request: only what Koala's rules need.

Both middlewares fill one of these from their protocol (``environ`` or ``scope``); every
rule after that (cookie, privacy, tracker) reads this, so it is written once for both.
Everything here comes from the network and is untrusted.
"""

from __future__ import annotations

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
