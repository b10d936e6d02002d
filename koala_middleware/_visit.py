"""One request's life in the middleware, shared by the WSGI and ASGI glue.

``Visits.start(...)`` decides, once per request: is it tracked (excluded path, Global
Privacy Control, your consent callback), who the visitor is (their ``ko_id`` cookie or a
fresh id), and which ``Set-Cookie`` the response needs; the request's tracker then tells
the glue, at response start, what to add (``tracker.start_response``), and hands itself
over after the response (``tracker.finish()``). This runs on every request: the glue passes the Cookie and Sec-GPC headers, and
anything else is read from the request (through its ``RequestReader``) only when a rule
needs it, so a returning visitor costs a cookie read and a tracker, nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from ._client import ClientOptions, KoalaClient, client_from_options
from ._cookie import WRITE_BOTH, CookieSettings, VisitorCookie
from ._pixel import DEFAULT_API_URL, DEFAULT_CDN_URL, PixelSettings
from ._request import RequestInfo, RequestReader
from ._tracker import RequestTracker

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: Your consent callback, ``should_track(info) -> bool`` (the ``should_track`` option).
ShouldTrack = Callable[[RequestInfo], bool]
SameSite = Literal["lax", "strict", "none", "Lax", "Strict", "None"]

logger = logging.getLogger("koala_middleware")
LOG_SHOULD_TRACK_FAILED = "should_track raised; not tracking this request (fix the callback)"

_COOKIE_DEFAULTS = CookieSettings()

# RequestTracker's ``enabled`` and ``fresh``, by name: passed by position (``start`` runs on
# every request, and keywords cost more), these say which is which.
_TRACKED, _NOT_TRACKED, _NEW_ID = True, False, True

#: Where the middlewares keep a request's tracker: ``environ``, ``scope`` (and through
#: them Django's ``request.META`` / ``request.scope``). A request that already holds one
#: was started by an outer Koala middleware, which alone sets its cookie and hands it over.
TRACKER_KEY = "koala.tracker"


def outer_tracker(holder: Mapping[str, Any] | None) -> RequestTracker | None:
    """The tracker an outer Koala middleware gave this request, if any."""
    return holder.get(TRACKER_KEY) if holder is not None else None


class VisitorOptions(ClientOptions, total=False):
    """Everything a middleware accepts by keyword when it is not given a ``client=``: the
    visitor options of :func:`configure` and :class:`~koala_middleware.KoalaClient`'s.

    Only for type checkers (``**options: Unpack[VisitorOptions]``); meanings and defaults
    are :func:`configure`'s and ``KoalaClient``'s.
    """

    cookie_name: str
    cookie_domain: str | None
    cookie_max_age: int
    cookie_secure: bool | None
    cookie_samesite: SameSite
    cookie_server_copy: bool
    cookie_server_copy_name: str
    allowed_hosts: Sequence[str] | None
    exclude_paths: Sequence[str]
    should_track: ShouldTrack | None
    respect_gpc: bool
    pixel_path: str | None
    pixel_api_url: str
    pixel_cdn_url: str
    pixel_max_body: int
    pixel_connect_timeout: float
    pixel_timeout: float
    pixel_cache_seconds: float


@dataclass(frozen=True, slots=True)
class MiddlewareSettings:
    """The visitor rules of one middleware, checked once (see :func:`configure`)."""

    cookie: CookieSettings = _COOKIE_DEFAULTS
    exclude_paths: Sequence[str] = ()  # made a tuple of normalised paths
    should_track: ShouldTrack | None = None
    respect_gpc: bool = True
    pixel: PixelSettings | None = None  # the first-party pixel proxy (docs/pixel.md), off by default

    def __post_init__(self) -> None:
        if isinstance(self.exclude_paths, str):
            raise TypeError(
                f"exclude_paths must be a list of paths, e.g. ['/healthz', '/static'], got {self.exclude_paths!r}"
            )
        paths = tuple(self.exclude_paths)
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"exclude_paths entries must be paths starting with '/', got {path!r}")
        object.__setattr__(self, "exclude_paths", tuple(p.rstrip("/") or "/" for p in paths))
        if self.should_track is not None and not callable(self.should_track):
            raise TypeError(f"should_track must be a callable should_track(info) -> bool, got {self.should_track!r}")
        if not isinstance(self.respect_gpc, bool):
            raise TypeError(f"respect_gpc must be True or False, got {self.respect_gpc!r}")

    def excluded(self, path: str) -> bool:
        for prefix in self.exclude_paths:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return True
        return False


def configure(
    client: KoalaClient | None,
    /,
    *,
    cookie_name: str = _COOKIE_DEFAULTS.name,
    cookie_domain: str | None = _COOKIE_DEFAULTS.domain,
    cookie_max_age: int = _COOKIE_DEFAULTS.max_age,
    cookie_secure: bool | None = _COOKIE_DEFAULTS.secure,
    cookie_samesite: SameSite = "lax",
    cookie_server_copy: bool = _COOKIE_DEFAULTS.server_copy,
    cookie_server_copy_name: str = _COOKIE_DEFAULTS.server_copy_name,
    allowed_hosts: Sequence[str] | None = _COOKIE_DEFAULTS.allowed_hosts,
    exclude_paths: Sequence[str] = (),
    should_track: ShouldTrack | None = None,
    respect_gpc: bool = True,
    pixel_path: str | None = None,
    pixel_api_url: str = DEFAULT_API_URL,
    pixel_cdn_url: str = DEFAULT_CDN_URL,
    pixel_max_body: int = 1024 * 1024,
    pixel_connect_timeout: float = 3.0,
    pixel_timeout: float = 15.0,
    pixel_cache_seconds: float = 300.0,
    **client_options: Unpack[ClientOptions],
) -> tuple[KoalaClient, MiddlewareSettings]:
    """The middlewares' options, in one place: the client to send with, and the visitor rules.

    :param client: a shared client; without one, one is made from ``client_options``.
    :param cookie_name: the visitor cookie, ``ko_id`` as Koala's pixel names it.
    :param cookie_domain: the cookie's ``Domain``; by default the request host's top domain
        (from the Public Suffix List), so the pixel on every subdomain sees the same id.
    :param cookie_max_age: seconds (default one year; browsers cap it at 400 days).
    :param cookie_secure: ``Secure``; by default set on https requests.
    :param cookie_samesite: ``lax`` (default), ``strict`` or ``none`` (which needs Secure).
    :param cookie_server_copy: keep a server-kept, HttpOnly copy of the id (default on):
        Safari caps cookies written by JavaScript, as the pixel writes ``ko_id``, at 7 days;
        the copy, set in a ``Set-Cookie`` header, is not capped and restores ``ko_id``.
    :param cookie_server_copy_name: the copy's cookie name (default ``ko_id_server``).
    :param allowed_hosts: hosts the cookie may be set for (and their subdomains); others get
        no cookie. Default: any host.
    :param exclude_paths: paths (and everything under them) that get no cookie and no
        tracking, e.g. ``("/healthz", "/static")``.
    :param should_track: ``should_track(info) -> bool``, your consent decision; when it says
        no, no cookie is set and the tracker's calls are validated but ignored.
    :param respect_gpc: honour the ``Sec-GPC: 1`` header as an opt-out (default on).
    :param pixel_path: serve Koala's browser pixel first-party under this path, e.g. ``"/_k"``
        (off by default): requests under it go to Koala's upstreams, never to the app.
    :param pixel_api_url: the pixel's API upstream (every path under ``pixel_path`` but ``/v1/``).
    :param pixel_cdn_url: the pixel's CDN upstream (``/v1/...``: ``sdk.js`` and its chunks).
    :param pixel_max_body: the largest request body the pixel proxy forwards, in bytes (else 413).
    :param pixel_connect_timeout: seconds to connect to a pixel upstream (else 502/504).
    :param pixel_timeout: seconds for a pixel upstream's whole answer (else 504, or a cut answer).
    :param pixel_cache_seconds: the cap on keeping CDN scripts in memory (their ``max-age`` rules
        below it); ``0`` turns the cache off.
    """
    cookie = CookieSettings(
        name=cookie_name,
        domain=cookie_domain,
        allowed_hosts=allowed_hosts,
        max_age=cookie_max_age,
        secure=cookie_secure,
        samesite=cookie_samesite,
        server_copy=cookie_server_copy,
        server_copy_name=cookie_server_copy_name,
    )
    pixel = None
    if pixel_path is not None:
        pixel = PixelSettings(
            pixel_path,
            pixel_api_url,
            pixel_cdn_url,
            pixel_max_body,
            pixel_connect_timeout,
            pixel_timeout,
            pixel_cache_seconds,
        )
    settings = MiddlewareSettings(cookie, exclude_paths, should_track, respect_gpc, pixel)
    unknown = client_options.keys() - ClientOptions.__optional_keys__
    if unknown:  # a clearer message than KoalaClient's own TypeError
        raise TypeError(
            f"unknown option(s) {sorted(unknown)}; the visitor options are "
            f"{sorted(VisitorOptions.__optional_keys__ - ClientOptions.__optional_keys__)}, "
            "the rest are KoalaClient's"
        )
    return client_from_options(client, client_options), settings


#: The tracker class a glue makes per request: ``RequestTracker`` or its own subclass,
#: which adds the response hook the glue hands the app (one object per request).
TrackerT = TypeVar("TrackerT", bound=RequestTracker)


class Visits(Generic[TrackerT]):
    """Per-middleware-instance rules: settings, and the client that receives trackers.

    :param reader: how the glue's protocol reads its request object, part by part.
    :param tracker_type: the class of the trackers it makes.
    """

    __slots__ = (
        "_cookie",
        "_excluded",
        "_reader",
        "_remembered",
        "_respect_gpc",
        "_should_track",
        "_tracker_type",
        "client",
        "read_visitor",
        "settings",
    )

    def __init__(
        self, client: KoalaClient, settings: MiddlewareSettings, reader: RequestReader, tracker_type: type[TrackerT]
    ) -> None:
        self.client = client
        self._tracker_type = tracker_type
        self.settings = settings
        self._reader = reader
        # Read once: ``start`` runs on every request.
        self._cookie = VisitorCookie(settings.cookie)
        self._excluded = settings.excluded if settings.exclude_paths else None
        #: ``read_visitor(request) -> (user_agent, ip)``, for a tracker's batch.
        self.read_visitor = reader.visitor
        self._respect_gpc = settings.respect_gpc
        self._should_track = settings.should_track
        #: The cookie cache's lookup when no rule reads the request (no ``exclude_paths``,
        #: no ``should_track``), else None: see :meth:`enter`'s shortcut.
        self._remembered = self._cookie.remembered if self._excluded is None and self._should_track is None else None

    def enter(self, holder: MutableMapping[str, Any], request: Any, cookie: object, gpc: bool) -> TrackerT | None:
        """The request lifecycle's start, for every stack: this request's tracker, kept in
        ``holder`` (its ``environ`` or ``scope``) under :data:`TRACKER_KEY`; or None when an
        outer Koala middleware already started it (then this one only passes it on: one
        request, one visitor id, one hand-over).
        """
        if TRACKER_KEY in holder:
            return None
        # The usual request, start()'s last line without its calls: a returning visitor with
        # both cookies, whose Cookie header was read before, no Sec-GPC, and no rule to ask.
        # Every request passes here (micro, one returning-visitor request through the ASGI
        # glue: enter 0.54 -> 0.40 us). Anything else, or an unseen header, goes through start().
        remembered = self._remembered
        if remembered is not None and not gpc and (cookie.__class__ is bytes or cookie.__class__ is str):
            found = remembered(hash(cookie))
            if found is not None and not found[1]:  # no cookie to (re)write
                tracker = holder[TRACKER_KEY] = self._tracker_type(self.client, found[0], _TRACKED, request, self)
                return tracker
        tracker = self.start(request, cookie, gpc)
        holder[TRACKER_KEY] = tracker
        return tracker

    def start(self, request: Any, cookie: object, gpc: bool) -> TrackerT:
        """This request's tracker, which knows the ``Set-Cookie`` values its response needs
        (the glue asks it at response start: ``tracker.start_response(...)``).

        :param request: the ``environ`` or ``scope``; other parts are read from it when needed.
        :param cookie: the Cookie header (several joined with ``"; "``), or None; bytes
            (latin-1) from ASGI, str from WSGI; any other type is read as well as it can be.
        :param gpc: the request carries ``Sec-GPC: 1``.
        """
        client = self.client
        make = self._tracker_type  # this glue's tracker class
        if self._excluded is not None and self._excluded(self._reader.path(request)):
            return make(client, None, _NOT_TRACKED, request, self)
        found = self._cookie.resolve(cookie)
        if (gpc and self._respect_gpc) or (
            self._should_track is not None and not _consents(self._should_track, self._reader.info(request))
        ):
            return make(client, found[0] if found is not None else None, _NOT_TRACKED, request, self)
        if found is None:
            visitor_id, set_cookies = self.new_visitor(request)
            return make(client, visitor_id, _TRACKED, request, self, set_cookies, _NEW_ID)
        visitor_id, writes = found
        if writes:  # a returning visitor with one of the two cookies missing or stale
            host, https = self._reader.site(request)
            return make(
                client, visitor_id, _TRACKED, request, self, self._cookie.set_cookies(visitor_id, writes, host, https)
            )
        return make(client, visitor_id, _TRACKED, request, self)

    def new_visitor(self, request: Any) -> tuple[str, list[str]]:
        """A fresh visitor id and the ``Set-Cookie`` values that give it to the browser."""
        visitor_id = self._cookie.issue()
        host, https = self._reader.site(request)
        return visitor_id, self._cookie.set_cookies(visitor_id, WRITE_BOTH, host, https)


def _consents(should_track: ShouldTrack, info: RequestInfo) -> bool:
    """Your consent callback; when it fails, the visitor is not tracked (the safe answer)."""
    try:
        return bool(should_track(info))
    except Exception:
        logger.exception(LOG_SHOULD_TRACK_FAILED)
        return False
