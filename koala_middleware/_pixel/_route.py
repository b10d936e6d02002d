"""What goes to which upstream, and which headers cross the proxy in each direction.

Protocol-neutral (the WSGI, ASGI and Django glue fill the arguments), and free of I/O. The
upstream host is always the configured one: the request chooses only the path below the
first-party prefix, which is checked and re-quoted, never joined raw.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

from .._request import client_ip
from ._settings import PixelSettings

__all__ = ["METHODS", "Outgoing", "Rejected", "answer_headers", "route"]

#: The methods Koala's reference proxy allows on its API distribution.
METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "POST", "PATCH", "DELETE"})

#: Request headers forwarded as they are: Koala's list (Origin, Accept, User-Agent), what a
#: body needs (Content-Type), what the answer is chosen by (Accept-Encoding: compressed
#: answers pass through untouched; Accept-Language) and revalidation of cached scripts.
#: Everything else stays here: Authorization, the app's cookies, Referer, X-Forwarded-*
#: (client-controlled), Host (the upstream's own is sent).
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "content-type",
        "origin",
        "user-agent",
        "if-none-match",
        "if-modified-since",
    }
)

#: Never passed back: hop-by-hop (RFC 9110 7.6.1), and headers that would speak for the
#: whole site rather than for the pixel (HSTS, Alt-Svc, Clear-Site-Data...).
DROPPED_ANSWER_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "strict-transport-security",
        "alt-svc",
        "clear-site-data",
        "public-key-pins",
        "public-key-pins-report-only",
        "nel",
        "report-to",
        "service-worker-allowed",
    }
)

#: Koala's own cookies: the only ones that cross the proxy, either way.
KOALA_COOKIE_PREFIX = "ko_"

_QUERY_OK = re.compile(r"[\x21-\x7e]*")
_UNSAFE_PATH = re.compile(r"[\x00-\x1f\x7f\\]")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
# RFC 3986 pchar minus '%': the decoded path is quoted afresh, so a '%' is a literal one.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


class Rejected(Exception):
    """A request the proxy refuses, with the status to answer (never reflected input)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class Outgoing:
    """One request as it goes upstream."""

    method: str
    url: str
    headers: list[tuple[str, str]]
    #: The CDN's answers (scripts) may be kept in memory; the API's never are.
    cdn: bool
    #: The path below the prefix, to rewrite ``Location`` back under it.
    path: str


def route(
    settings: PixelSettings,
    method: str,
    path: str,
    query: str,
    headers: Iterable[tuple[str, str]],
    ip: str | None,
    port: int | None,
    websocket: bool = False,
) -> Outgoing:
    """The upstream request for a request to ``settings.path + path`` (``path`` decoded,
    starting with ``/``; ``query`` raw); raises :class:`Rejected` for what must not go.

    :param headers: the request's headers, names lower case.
    :param ip: the visitor's address as the server's proxy handling corrected it; left out
        unless it parses as an IPv4 or IPv6 address (as in the batches).
    :param port: the visitor's port, 0 or None when not known (behind a proxy).
    """
    if method not in METHODS:
        raise Rejected(405, f"method {method[:20]!r} not allowed")
    if _UNSAFE_PATH.search(path) or "//" in path or not path.startswith("/"):
        raise Rejected(400, "path with control characters, backslashes or an empty segment")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise Rejected(400, "path with '.' or '..' segments")
    if not _QUERY_OK.fullmatch(query):
        raise Rejected(400, "query with spaces, control or non-ASCII characters")
    cdn = path == "/v1" or path.startswith("/v1/")
    base = (settings.cdn_url if cdn else settings.api_url) if not websocket else settings.api_url
    url = base + quote(path, safe=_PATH_SAFE) + ("?" + query if query else "")
    forwarded: list[tuple[str, str]] = []
    cookies: list[str] = []
    for name, value in headers:
        if _BAD_VALUE.search(value):
            continue
        if name in FORWARDED_REQUEST_HEADERS:
            forwarded.append((name, value))
        elif name == "cookie":
            cookies.extend(koala_cookies(value))
    if cookies:
        forwarded.append(("cookie", "; ".join(cookies)))
    ip = client_ip(ip)  # the batches' rule: an address only when it parses as one
    if ip:
        # The address the server's proxy handling settled on (never the client's own
        # X-Forwarded-For), as Koala's CloudFront set-up and other proxies would send it.
        forwarded.append(("x-forwarded-for", ip))
        forwarded.append(("cloudfront-viewer-address", f"{ip}:{port or 0}"))
    return Outgoing(method, url, forwarded, cdn, path)


def koala_cookies(header: str) -> list[str]:
    """The ``ko_*`` pairs of a Cookie header, as they were."""
    found = []
    for pair in header.split(";"):
        pair = pair.strip()
        if pair.startswith(KOALA_COOKIE_PREFIX) and "=" in pair:
            found.append(pair)
    return found


def answer_headers(
    headers: Iterable[tuple[str, str]], site_host: str | None, prefix: str, upstream: str
) -> list[tuple[str, str]]:
    """The upstream answer's headers as the visitor gets them: hop-by-hop and site-wide
    ones dropped, ``Set-Cookie`` only for ``ko_*`` (a ``Domain`` outside the site removed,
    so the cookie is the site's own), ``Location`` brought back under the prefix."""
    hop = set(DROPPED_ANSWER_HEADERS)
    headers = list(headers)
    for name, value in headers:
        if name.lower() == "connection":
            hop.update(token.strip().lower() for token in value.split(","))
    kept: list[tuple[str, str]] = []
    for name, value in headers:
        lower = name.lower()
        if lower in hop:
            continue
        if lower == "set-cookie":
            cookie = _site_cookie(value, site_host)
            if cookie is not None:
                kept.append((name, cookie))
            continue
        if lower == "location":
            value = _location(value, prefix, upstream)
        kept.append((name, value))
    return kept


def _site_cookie(value: str, site_host: str | None) -> str | None:
    name = value.partition("=")[0].strip()
    if not name.startswith(KOALA_COOKIE_PREFIX):
        return None
    parts = [part for part in value.split(";")]
    kept = [parts[0]]
    host = (site_host or "").rsplit(":", 1)[0].lower() if site_host and not site_host.startswith("[") else ""
    for attribute in parts[1:]:
        key, _, domain = attribute.strip().partition("=")
        if key.lower() == "domain":
            domain = domain.strip().lstrip(".").lower()
            if not host or not domain or "." not in domain or not (host == domain or host.endswith("." + domain)):
                continue  # outside the site: the cookie becomes the site host's own
        kept.append(attribute)
    return ";".join(kept)


def _location(value: str, prefix: str, upstream: str) -> str:
    if value.startswith(upstream + "/"):
        return prefix + value[len(upstream) :]
    if value.startswith("/") and not value.startswith("//"):
        return prefix + value
    return value
