"""Rules for the ``ko_id`` visitor cookie, shared by the WSGI and ASGI middlewares.

Koala's browser pixel identifies a visitor by the ``ko_id`` cookie, so the
middlewares read and set that same cookie: readable from JavaScript (never
HttpOnly), ``Path=/`` and scoped to the registrable domain ("eTLD+1") so that
every subdomain of a site shares one visitor id.

Beside it the middlewares keep a server-kept copy of the id (``ko_id_server``, HttpOnly):
Safari caps cookies written by JavaScript (as the pixel writes ``ko_id``) at 7 days, but
not cookies set in a ``Set-Cookie`` header by the site's own server, so the copy outlives
an expired ``ko_id`` and restores it.

This runs on every request and the Cookie and Host headers are client-controlled:
parsing never raises, rejected values are never echoed, and per-host work is
memoised in bounded caches.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from ._ids import random_uuid4
from ._request import header_text

logger = logging.getLogger("koala_middleware")

MAX_AGE_CAPPED_MESSAGE = "Cookie max_age capped at %d seconds (400 days), the most browsers keep a cookie"
SHARED_CACHE_SKIP_MESSAGE = "Visitor cookie not set on responses a shared cache may store (logged once)"

MAX_AGE_LIMIT = 400 * 24 * 3600  # browsers clamp cookie lifetimes to 400 days (RFC 6265bis)
_CACHE_SIZE = 1024  # Host headers are client-controlled: keep every per-host cache bounded.
_MAX_HOST_INPUT = 300  # longer than any valid name with a port; also keeps cache keys small
_SEEN_SIZE = 4096  # Cookie headers whose visitor id is remembered (an int and an id each)
# RFC 6265 cookie-name: an RFC 7230 token.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A visitor id Koala's pixel or server may have written: a URL-safe token of 16 to 64
# characters, which covers UUIDs of any version in either case and nanoid-style ids; never
# the nil UUID (a placeholder, not an id). Kept exactly as written: Koala matches the string.
_NIL_UUID = "00000000-0000-0000-0000-000000000000"
_VISITOR_ID = r"(?!" + _NIL_UUID + r"(?![A-Za-z0-9_-]))[A-Za-z0-9_-]{16,64}"
_VISITOR_ID_RE = re.compile(_VISITOR_ID)
# Letters, digits, hyphen and underscore (browsers accept ``_``); no empty labels.
_HOSTNAME = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
# A Cache-Control directive name, skipping its value (a quoted-string may hold commas).
_DIRECTIVE = re.compile(r'([^\s,="]+)[ \t]*(?:=[ \t]*(?:"(?:[^"\\]|\\.)*"|[^,]*))?')
_SAMESITE = {"lax": "Lax", "strict": "Strict", "none": "None"}


#: The middlewares' keyword for each setting: errors name what the user wrote.
KEYWORDS = {
    "name": "cookie_name",
    "domain": "cookie_domain",
    "allowed_hosts": "allowed_hosts",
    "max_age": "cookie_max_age",
    "secure": "cookie_secure",
    "samesite": "cookie_samesite",
    "server_copy": "cookie_server_copy",
    "server_copy_name": "cookie_server_copy_name",
}


@dataclass(frozen=True, slots=True)
class CookieSettings:
    """How the visitor cookie is scoped; validated once so the hot path can trust it."""

    name: str = "ko_id"
    domain: str | None = None
    allowed_hosts: Sequence[str] | None = None  # made a tuple of normalised hosts
    max_age: int = 365 * 24 * 3600
    secure: bool | None = None
    samesite: str = "lax"
    #: Keep a server-kept HttpOnly copy of the id (see the module's docstring).
    server_copy: bool = True
    server_copy_name: str = "ko_id_server"

    def __post_init__(self) -> None:
        _check_name("name", self.name)
        if not isinstance(self.server_copy, bool):
            raise TypeError(f"cookie_server_copy must be True or False, got {self.server_copy!r}")
        _check_name("server_copy_name", self.server_copy_name)
        if self.server_copy and self.server_copy_name == self.name:
            raise ValueError("cookie_server_copy_name must differ from cookie_name (the copy is another cookie)")
        if self.domain is not None:
            domain = _setting_host("domain", self.domain)
            if _is_ip(domain) or _public_suffix_list().is_public(domain):
                # A browser rejects a Domain attribute naming a public suffix (or an IP):
                # every visitor would get a new id on every request.
                raise ValueError(
                    f"cookie_domain {domain!r} is "
                    f"{'an IP address' if _is_ip(domain) else 'a public suffix (browsers refuse cookies for it)'}; "
                    "name your own registrable domain, e.g. 'example.co.uk', or leave it unset"
                )
            object.__setattr__(self, "domain", domain)
        if self.allowed_hosts is not None:
            if isinstance(self.allowed_hosts, (str, bytes)):
                raise TypeError("allowed_hosts must be a list or tuple of host names, not one string")
            hosts = tuple(_setting_host("allowed_hosts", h) for h in self.allowed_hosts)
            object.__setattr__(self, "allowed_hosts", hosts)
        if isinstance(self.max_age, bool) or not isinstance(self.max_age, int):
            raise TypeError(f"cookie_max_age must be a whole number of seconds, got {self.max_age!r}")
        if self.max_age <= 0:
            raise ValueError(
                f"cookie_max_age must be a positive number of seconds (a lifetime, not a deletion), got {self.max_age!r}"
            )
        if self.max_age > MAX_AGE_LIMIT:
            logger.debug(MAX_AGE_CAPPED_MESSAGE, MAX_AGE_LIMIT)
            object.__setattr__(self, "max_age", MAX_AGE_LIMIT)
        if self.secure is not None and not isinstance(self.secure, bool):
            raise TypeError(
                f"cookie_secure must be True, False or None (None: Secure on https requests), got {self.secure!r}"
            )
        samesite = self.samesite.lower() if isinstance(self.samesite, str) else None
        if samesite not in _SAMESITE:
            raise ValueError(f"cookie_samesite must be 'lax', 'strict' or 'none', got {self.samesite!r}")
        if samesite == "none" and self.secure is False:
            raise ValueError("cookie_samesite='none' requires Secure: leave cookie_secure as None or set it True")
        object.__setattr__(self, "samesite", samesite)


def _check_name(option: str, name: object) -> None:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise ValueError(f"{KEYWORDS[option]} may only hold ASCII letters, digits and !#$%&'*+.^_`|~-, got {name!r}")
    if name.lower().startswith(("__secure-", "__host-")):
        # Browsers drop such cookies when set without Secure or with a Domain.
        raise ValueError(f"{KEYWORDS[option]} must not start with __Secure- or __Host-; use a plain name")


def _is_ip(host: str) -> bool:
    """An IPv4 or IPv6 address, as browsers parse a host (a last label that is a number)."""
    return ":" in host or _NUMERIC_LABEL.fullmatch(host.rpartition(".")[2]) is not None


def _setting_host(option: str, value: object) -> str:
    """Normalise a configured host name, refusing anything a Domain attribute cannot hold."""
    if not isinstance(value, str):
        raise TypeError(f"{KEYWORDS[option]} must be a host name string such as 'example.com', got {value!r}")
    host = normalize_host(value.strip().lstrip("."))
    if host is None or ":" in value:
        raise ValueError(
            f"{KEYWORDS[option]} must be a host name such as 'example.com', without scheme or port, got {value!r}"
        )
    return host


# The separator and the space browsers write after it; other spacing takes the search.
_SEPARATOR = "; "


def _search_visitor_id(cookie_headers: Iterable[str], name: str) -> str | None:
    """One regular-expression search per header finds the first ``name`` cookie whose value
    (spaces and tabs around it, and one pair of double quotes, aside) is a valid id."""
    pattern = _visitor_id_patterns.get(name)
    if pattern is None:
        pattern = _visitor_id_patterns[name] = _visitor_id_pattern(name)
    for header in cookie_headers:
        if not isinstance(header, str) or name not in header:
            continue
        found = pattern.search(header)
        while found is not None:
            # The name must start the cookie: only spaces or tabs since a separator.
            before = header[: found.start()].rstrip(" \t")
            if not before or before[-1] == ";":
                return found.group(2)
            found = pattern.search(header, found.start() + 1)
    return None


def _visitor_id_pattern(name: str) -> re.Pattern[str]:
    """``name=<id>`` up to the separator (``;``) or the end, the id alone or in double
    quotes. Only ``;`` separates cookies (RFC 6265bis, as browsers send them): a ``,``
    belongs to a value, so another cookie's value can never pose as the visitor id. Starting with the name lets the search skip ahead to it; what precedes the
    name is checked by the caller."""
    return re.compile(re.escape(name) + r'[ \t]*=[ \t]*("?)(' + _VISITOR_ID + r")\1[ \t]*(?=;|\Z)")


# Compiled patterns by cookie name (names come from settings, never from the network).
_visitor_id_patterns: dict[str, re.Pattern[str]] = {}


def normalize_host(host: str) -> str | None:
    """The bare, lower-case, ASCII host name of a Host header or server name, or None if invalid."""
    if not isinstance(host, str) or len(host) > _MAX_HOST_INPUT:
        return None
    return _normalize_host(host)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _normalize_host(host: str) -> str | None:
    host = host.strip(" \t")
    if host.startswith("["):
        address, _, rest = host[1:].partition("]")
        return _ipv6(address) if rest[:1] in ("", ":") and _is_port(rest[1:]) else None
    if host.count(":") > 1:
        return _ipv6(host)  # a bare IPv6 address, as in some server names
    host, _, port = host.partition(":")
    if not _is_port(port):
        return None
    host = (host[:-1] if host.endswith(".") else host).lower()
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii").lower()
        except (UnicodeError, ValueError):
            return None
    return host if len(host) <= 253 and _HOSTNAME.fullmatch(host) else None


def _is_port(port: str) -> bool:
    return not port or (port.isascii() and port.isdigit())  # RFC 3986 allows an empty port


def _ipv6(address: str) -> str | None:
    try:
        return ipaddress.IPv6Address(address).compressed
    except ValueError:
        return None


_psl: PublicSuffixList | None = None
_psl_lock = threading.Lock()


def _public_suffix_list() -> PublicSuffixList:
    """Parse the bundled list once, on first use: it costs tens of milliseconds."""
    global _psl
    if _psl is None:
        with _psl_lock:
            if _psl is None:
                _psl = PublicSuffixList()
    return _psl


@functools.lru_cache(maxsize=_CACHE_SIZE)
def top_domain(host: str) -> str | None:
    """The registrable domain a cookie may be scoped to, or None for a host-only cookie."""
    if not isinstance(host, str) or len(host) > 253 or not _HOSTNAME.fullmatch(host):
        return None  # IPv6 addresses (':') and malformed names
    if _NUMERIC_LABEL.fullmatch(host.rpartition(".")[2]):
        return None  # browsers parse a host ending in a number as an IPv4 address
    return _public_suffix_list().privatesuffix(host)


def _is_under(host: str, domain: str) -> bool:
    return host == domain or host.endswith("." + domain)


def cookie_domain(host: str | None, settings: CookieSettings) -> str | None:
    """The Domain attribute for a request to ``host``; None means a host-only cookie."""
    normalized = normalize_host(host) if host is not None else None
    if normalized is None:
        return None
    if settings.domain is not None:
        # A browser rejects a cookie whose Domain does not cover the request host.
        return settings.domain if _is_under(normalized, settings.domain) else None
    if settings.allowed_hosts is not None and not any(_is_under(normalized, h) for h in settings.allowed_hosts):
        return None
    return top_domain(normalized)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cookie_attributes(host: str | None, https: bool, settings: CookieSettings) -> str:
    domain = cookie_domain(host, settings)
    attributes = f"; Domain={domain}" if domain else ""
    attributes += f"; Path=/; Max-Age={settings.max_age}; SameSite={_SAMESITE[settings.samesite]}"
    if settings.secure or (settings.secure is None and https) or settings.samesite == "none":
        attributes += "; Secure"
    return attributes


#: What a request's cookies leave to write (bits): nothing, the copy, ``ko_id``, or both.
WRITE_NONE = 0
WRITE_COPY = 1
WRITE_ID = 2
WRITE_BOTH = WRITE_COPY | WRITE_ID


class VisitorCookie:
    """One middleware's visitor cookies: reads ``ko_id`` (and its server-kept copy) of each
    request, says which of them the response must write, and issues new ids.

    Reading runs on every request, so what is read from a Cookie header is memoised, in a
    bounded cache (the header is client-controlled; the ``Set-Cookie`` attributes per host
    have theirs, ``_by_site`` in front of ``_cookie_attributes``). A visitor's page, its API calls and its assets
    send the same header; seen before, it costs one hash and one lookup. The reading cache is keyed by the
    header's hash, so it keeps no cookie values (sessions, tokens) in memory; a collision of
    the keyed 64-bit hash is out of reach. Unseen headers are read with one ``find`` and one
    anchored match per cookie name (or, for unusual ones, a search).
    """

    __slots__ = (
        "_by_site",
        "_copy",
        "_copy_name",
        "_name",
        "_plain_copy",
        "_plain_id",
        "_seen",
        "remembered",
        "settings",
    )

    def __init__(self, settings: CookieSettings) -> None:
        self.settings = settings
        self._name = settings.name
        self._plain_id = _plain_matcher(settings.name)
        self._copy = settings.server_copy
        self._copy_name = settings.server_copy_name
        self._plain_copy = _plain_matcher(settings.server_copy_name)
        self._seen: dict[int, tuple[str, int]] = {}
        #: ``(host, https)`` -> the cookies' attributes: ``_cookie_attributes``'s own cache
        #: hashes the settings (a dataclass of eight fields) on every call; this dict of the
        #: hosts seen costs one lookup (micro: 250 -> 60 ns; bench part 1, new visitor).
        self._by_site: dict[tuple[str | None, bool], str] = {}
        #: ``remembered(hash(header))``: what :meth:`resolve` found for a str or bytes Cookie
        #: header it read before, or None (the cache's own ``get``: see ``Visits.enter``).
        self.remembered = self._seen.get

    def read(self, cookie: object) -> str | None:
        """The visitor id in a Cookie header (several joined with ``"; "``), or None."""
        found = self.resolve(cookie)
        return found[0] if found is not None else None

    def resolve(self, cookie: object) -> tuple[str, int] | None:
        """``(visitor_id, writes)`` for a Cookie header, or None for a new visitor.

        The id is ``ko_id`` when valid, else the server-kept copy's; ``writes`` says which
        cookies the response must (re)write: ``WRITE_COPY`` when the copy is missing or
        differs (``ko_id`` wins), ``WRITE_ID`` when only the copy was valid. ``bytes``
        (ASGI) are latin-1, as HTTP headers are; ``str`` is a WSGI header.
        """
        if cookie is None:
            return None
        if cookie.__class__ is not str and cookie.__class__ is not bytes:
            cookie = header_text(cookie)  # a list, bytearray...: from an odd server
            if cookie is None:
                return None
        key = hash(cookie)
        found = self._seen.get(key)
        if found is None:
            found = self._parse(cookie.decode("latin-1") if isinstance(cookie, bytes) else str(cookie))
            if found is not None:
                if len(self._seen) >= _SEEN_SIZE:
                    self._seen.clear()  # a new generation: simpler and cheaper than LRU order
                self._seen[key] = found
        return found

    def _parse(self, cookie: str) -> tuple[str, int] | None:
        visitor_id = _first_id(cookie, self._name, self._plain_id)
        if not self._copy:
            return None if visitor_id is None else (visitor_id, WRITE_NONE)
        copy = _first_id(cookie, self._copy_name, self._plain_copy)
        if visitor_id is None:
            return None if copy is None else (copy, WRITE_ID)
        return visitor_id, WRITE_NONE if copy == visitor_id else WRITE_COPY

    def issue(self) -> str:
        """A fresh visitor id (its cookies: ``set_cookies(id, WRITE_BOTH, ...)``)."""
        return random_uuid4()

    def set_cookies(self, visitor_id: str, writes: int, host: str | None, https: bool) -> list[str]:
        """The ``Set-Cookie`` values that write ``visitor_id`` to the cookies in ``writes``:
        the same attributes for both, and HttpOnly for the copy (only the server writes it)."""
        if host.__class__ is not str or len(host) > _MAX_HOST_INPUT:
            host = None  # client-controlled: odd or oversized hosts stay out of the caches
        key = (host, https)
        attributes = self._by_site.get(key)  # one lookup for both cookies
        if attributes is None:
            if len(self._by_site) >= _CACHE_SIZE:
                self._by_site.clear()  # client-controlled hosts: bounded, as _seen is
            attributes = self._by_site[key] = _cookie_attributes(host, bool(https), self.settings)
        headers = []
        if writes & WRITE_ID:
            headers.append(f"{self._name}={visitor_id}{attributes}")
        if writes & WRITE_COPY and self._copy:
            headers.append(f"{self._copy_name}={visitor_id}{attributes}; HttpOnly")
        return headers


def _plain_matcher(name: str) -> Callable[[str, int], re.Match[str] | None]:
    return re.compile(re.escape(name + "=") + "(" + _VISITOR_ID + ")(?=;|\\Z)").match


def _first_id(cookie: str, name: str, plain: Callable[[str, int], re.Match[str] | None]) -> str | None:
    """The first valid ``name`` cookie's id: the first occurrence of the name, when it
    starts a cookie as ``name=<id>``, is the first valid one; anything else is searched."""
    start = cookie.find(name)
    if start < 0:
        return None
    if start == 0 or cookie[start - 1] == ";" or cookie[start - 2 : start] == _SEPARATOR:
        found = plain(cookie, start)
        if found is not None:
            return found.group(1)
    return _search_visitor_id((cookie,), name)


_logged_shared_cache_skip = False


def may_set_cookie(status: int, cache_control: str | None) -> bool:
    """Whether a Set-Cookie may be added without a shared cache replaying it to other visitors.

    A shared cache (a CDN, a reverse proxy) may store a response, as RFC 9111 (sections 3
    and 5.2.2) has it, when its Cache-Control gives it explicit leave: ``public``,
    ``s-maxage`` or ``max-age``, and neither ``private`` nor ``no-store`` (an unqualified or
    a qualified ``private="set-cookie"``: either keeps the cookie out of shared caches).
    Such a response gets no cookie, nor does a 304 (it only refreshes a stored response).
    Without Cache-Control a response gets its cookie: RFC 9111 lets caches store some of those
    heuristically, but CDNs and proxies do not store a response that sets a cookie unless
    told to, and withholding it from every such response would leave new visitors unknown.
    """
    global _logged_shared_cache_skip
    if status == 304:
        return False
    if not cache_control:
        return True
    lowered = cache_control.lower()
    if "public" not in lowered and "max" not in lowered:  # max-age, s-maxage
        return True
    directives = set(_DIRECTIVE.findall(lowered))
    if "private" in directives or "no-store" in directives or directives.isdisjoint(_SHARED_STORE):
        return True
    if not _logged_shared_cache_skip:
        _logged_shared_cache_skip = True
        logger.debug(SHARED_CACHE_SKIP_MESSAGE)
    return False


#: Directives that let a shared cache store a response (RFC 9111, section 3).
_SHARED_STORE = ("public", "s-maxage", "max-age")
