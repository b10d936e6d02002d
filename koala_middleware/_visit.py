"""One request's life in the middleware, shared by the WSGI and ASGI glue.

``Visits.start(info)`` decides, once per request: is it tracked (excluded path, Global
Privacy Control, your consent callback), who the visitor is (their ``ko_id`` cookie or a
fresh id), and which ``Set-Cookie`` the response needs. ``Visit.cookie_for(...)`` is asked
at response start; ``Visit.finish()`` hands the tracker over after the response.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from contextvars import Token
from dataclasses import dataclass, fields
from typing import Any

from ._client import CLIENT_ARGUMENTS, KoalaClient, client_from_options
from ._cookie import (
    CookieSettings,
    may_set_cookie,
    new_visitor_cookie,
    read_visitor_id,
)
from ._request import RequestInfo
from ._tracker import Tracker, bind, unbind

TrackDecision = Callable[[RequestInfo], bool]

logger = logging.getLogger("koala_middleware")
LOG_HANDOVER_FAILED = "could not hand the request's batch to the sender; it is lost"
LOG_SHOULD_TRACK_FAILED = "should_track raised; not tracking this request (fix the callback)"

_COOKIE_OPTIONS = {f"cookie_{f.name}": f.name for f in fields(CookieSettings)}
_COOKIE_OPTIONS["allowed_hosts"] = _COOKIE_OPTIONS.pop("cookie_allowed_hosts")
MIDDLEWARE_OPTIONS = frozenset(_COOKIE_OPTIONS) | {"exclude_paths", "should_track", "respect_gpc"}


@dataclass(frozen=True, slots=True)
class MiddlewareSettings:
    """The middleware options (the cookie ones are ``cookie_<name>`` and ``allowed_hosts``).

    :param exclude_paths: paths (and everything under them) that get no cookie and no
        tracking, e.g. ``("/healthz", "/static")``.
    :param should_track: ``should_track(info) -> bool``, your consent decision; when it says
        no, no cookie is set and the tracker's calls are validated but ignored.
    :param respect_gpc: honour the ``Sec-GPC: 1`` header as an opt-out (default on).
    """

    cookie: CookieSettings = CookieSettings()
    exclude_paths: tuple[str, ...] = ()
    should_track: TrackDecision | None = None
    respect_gpc: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.exclude_paths, str):
            raise TypeError("exclude_paths must be a list of paths, e.g. ['/healthz', '/static']")
        paths = tuple(self.exclude_paths)
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"exclude_paths entries must be paths starting with '/', got {path!r}")
        object.__setattr__(self, "exclude_paths", tuple(p.rstrip("/") or "/" for p in paths))
        if self.should_track is not None and not callable(self.should_track):
            raise TypeError("should_track must be a callable should_track(info) -> bool")

    def excluded(self, path: str) -> bool:
        for prefix in self.exclude_paths:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return True
        return False


def configure(client: KoalaClient | None, options: Mapping[str, Any]) -> tuple[KoalaClient, MiddlewareSettings]:
    """Split ``**options`` between the client and the middleware, rejecting unknown ones."""
    unknown = set(options) - MIDDLEWARE_OPTIONS - CLIENT_ARGUMENTS
    if unknown:
        raise TypeError(
            f"unknown option(s) {sorted(unknown)}; middleware options: {sorted(MIDDLEWARE_OPTIONS)}, "
            f"client options: {sorted(CLIENT_ARGUMENTS)}"
        )
    cookie = CookieSettings(**{_COOKIE_OPTIONS[k]: v for k, v in options.items() if k in _COOKIE_OPTIONS})
    settings = MiddlewareSettings(
        cookie=cookie,
        exclude_paths=options.get("exclude_paths", ()),  # checked (a lone str refused) and made a tuple there
        should_track=options.get("should_track"),
        respect_gpc=options.get("respect_gpc", True),
    )
    client_options = {k: v for k, v in options.items() if k in CLIENT_ARGUMENTS}
    return client_from_options(client, client_options), settings


class Visit:
    """The middleware's state for one request."""

    __slots__ = ("tracker", "set_cookie", "_token", "_visits")

    def __init__(self, visits: Visits, tracker: Tracker, set_cookie: str | None) -> None:
        self._visits = visits
        self.tracker = tracker
        #: The ``Set-Cookie`` value for a new visitor, or None.
        self.set_cookie = set_cookie
        self._token: Token[Tracker | None] | None = None

    def bind(self) -> None:
        """Make the tracker ``current_tracker()`` in this context."""
        self._token = bind(self.tracker)

    def cookie_for(self, status: int, cache_control: str | None) -> str | None:
        """The ``Set-Cookie`` to add to a response with this status, if any."""
        if self.set_cookie is None or not may_set_cookie(status, cache_control):
            return None
        return self.set_cookie

    def unbind(self) -> None:
        if self._token is not None:
            try:
                unbind(self._token)
            except ValueError:  # reset from another context (a server that moved threads)
                pass
            self._token = None

    def finish(self) -> None:
        """Unbind the tracker and hand over what the handler recorded."""
        self.unbind()
        tracker = self.tracker
        if tracker._count:
            try:
                self._visits.client.send_tracker(tracker)
            except Exception:  # the response is out: never raise into the server's close()
                logger.exception(LOG_HANDOVER_FAILED)


class Visits:
    """Per-middleware-instance rules: settings, and the client that receives trackers."""

    __slots__ = ("client", "settings", "_cookie_name", "_excluded", "_respect_gpc", "_should_track")

    def __init__(self, client: KoalaClient, settings: MiddlewareSettings) -> None:
        self.client = client
        self.settings = settings
        # Read once: ``start`` runs on every request.
        self._cookie_name = settings.cookie.name
        self._excluded = settings.excluded if settings.exclude_paths else None
        self._respect_gpc = settings.respect_gpc
        self._should_track = settings.should_track

    def visitor_id(self, cookie_headers: Iterable[str]) -> str | None:
        """The visitor's valid ``ko_id``, for code that only reads it (websockets)."""
        return read_visitor_id(cookie_headers, self._cookie_name)

    def start(self, info: RequestInfo) -> Visit:
        client = self.client
        if self._excluded is not None and self._excluded(info.path):
            return Visit(self, client._web_tracker(None, None, None, False), None)
        visitor_id = read_visitor_id(info.cookie_headers, self._cookie_name)
        should_track = self._should_track
        allowed = not (self._respect_gpc and info.gpc) and (should_track is None or _consents(should_track, info))
        set_cookie = None
        if allowed and visitor_id is None:
            visitor_id, set_cookie = new_visitor_cookie(info.host, info.https, self.settings.cookie)
        tracker = client._web_tracker(visitor_id, info.user_agent, info.ip, allowed)
        return Visit(self, tracker, set_cookie)


def _consents(should_track: TrackDecision, info: RequestInfo) -> bool:
    """Your consent callback; when it fails, the visitor is not tracked (the safe answer)."""
    try:
        return bool(should_track(info))
    except Exception:
        logger.exception(LOG_SHOULD_TRACK_FAILED)
        return False
