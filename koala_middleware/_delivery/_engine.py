"""The delivery engine: the one interface every path that talks to Koala posts through.

The background sender, ``sync=True`` and ``koala-middleware check`` all reach Koala through
an engine made here, so they share one set of rules:

- one **route** per client (:class:`Route`): the proxy from ``proxy=`` or else the
  environment (as curl and httpx resolve it), a ``CONNECT`` tunnel for ``https://`` through a
  proxy, TLS verified against certifi, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set;
- ``timeout`` is a deadline for the **whole attempt** (connect, proxy, TLS, the request and
  the answer to its last byte), so an answer that drips in is cut off;
- at most :data:`BODY_CAP` bytes of an answer are read: past them the connection is
  dropped, not drained;
- the request carries what the batch says (``User-Agent`` as built by ``_request``) and
  nothing else an HTTP library would add on its own.

Two engines implement it (see ``docs/delivery-engine.md`` for the measurements):

- ``_h11`` (the default, pure Python): h11 does the HTTP/1.1 framing, the standard
  library's ``ssl`` the TLS, asyncio Protocols (background) or a blocking socket
  (``sync=True``, ``check``) move the bytes;
- ``_curl`` (optional, ``pip install 'koala-middleware[curl]'``): libcurl through pycurl on
  the sender's loop, for the background sender only. It is chosen when pycurl imports and
  ``KOALA_ENGINE`` does not say ``python``.

Nothing here imports an HTTP library until an engine is made: ``import koala_middleware``
stays cheap in processes that never send (dry run, tests, WSGI workers before their first
batch).
"""

from __future__ import annotations

import base64
import logging
import os
import sys
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

from ._settings import PROXY_SCHEMES, DeliverySettings

if TYPE_CHECKING:
    import ssl

    from ._policy import Answer
    from ._request import Request

__all__ = [
    "BODY_CAP",
    "KEEPALIVE",
    "BlockingEngine",
    "Engine",
    "EngineError",
    "Route",
    "background_engine",
    "blocking_engine",
    "proxy_for",
]

logger = logging.getLogger("koala_middleware")

LOG_PROXY_UNSUPPORTED = "ignoring the proxy %r from the environment: only http:// and https:// proxies are supported"
LOG_ENGINE = "delivery engine: %s"
LOG_ENGINE_UNKNOWN = "KOALA_ENGINE=%r is not one of 'auto', 'python', 'curl'; using 'auto'"
LOG_CURL_MISSING = "KOALA_ENGINE=curl but pycurl cannot be imported (%s); using the pure-Python engine"

#: How much of an answer's body is read: Koala's answers are a few bytes of JSON, and an
#: excerpt for the logs needs no more. Past it the connection is dropped, not drained, so a
#: huge answer costs neither memory nor time.
BODY_CAP = 4096

#: Seconds an idle kept-alive connection is kept: httpx's default, well under the idle
#: timeouts of load balancers, so a connection is rarely closed under a request.
KEEPALIVE = 5.0

#: The environment variable that picks the background sender's engine: ``auto`` (libcurl
#: when pycurl imports, else pure Python), ``python`` or ``curl``.
ENGINE_VARIABLE = "KOALA_ENGINE"


class Engine(Protocol):
    """The background sender's engine: posts on the sender's asyncio loop."""

    #: What the DEBUG line at start names.
    name: str

    async def __call__(self, request: Request) -> Answer:
        """Post ``request`` within ``timeout``; Koala's answer, or raises (network, timeout)."""
        ...

    async def close(self) -> None: ...


class BlockingEngine(Protocol):
    """``sync=True`` and ``check``: the same rules, in the caller's thread, no event loop."""

    name: str

    def send(self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes, deadline: float) -> Answer:
        """One exchange that ends by ``deadline`` (``time.monotonic()``); raises on failure."""
        ...

    def close(self) -> None: ...


class EngineError(Exception):
    """An exchange that could not complete: connect, proxy, TLS or protocol trouble."""


def background_engine(settings: DeliverySettings) -> Engine:
    """The background sender's engine; call it on the sender's loop."""
    engine: Engine
    if _wants_curl():
        from ._curl import CurlEngine

        engine = CurlEngine(settings)
    else:
        from ._h11 import AsyncEngine

        engine = AsyncEngine(Route(settings.base_url, settings.proxy), settings)
    logger.debug(LOG_ENGINE, engine.name)
    return engine


def blocking_engine(settings: DeliverySettings) -> BlockingEngine:
    """The engine of ``sync=True`` and ``check``: always pure Python (nothing native for
    serverless users), with the same route, deadline and cap as the background sender."""
    from ._h11 import SocketEngine

    engine = SocketEngine(Route(settings.base_url, settings.proxy))
    logger.debug(LOG_ENGINE, engine.name)
    return engine


def _wants_curl() -> bool:
    choice = os.environ.get(ENGINE_VARIABLE, "auto").strip().lower() or "auto"
    if choice not in ("auto", "python", "curl"):
        logger.warning(LOG_ENGINE_UNKNOWN, choice)
        choice = "auto"
    if choice == "python":
        return False
    try:
        import pycurl  # noqa: F401
    except ImportError as error:
        if choice == "curl":
            logger.warning(LOG_CURL_MISSING, error)
        return False
    return True


def proxy_for(url: str, proxy: str | None = None) -> str | None:
    """The proxy to reach ``url`` through: ``proxy`` if given, else the environment's.

    As curl and ``httpx.Client(trust_env=True)``: ``<scheme>_proxy`` then ``all_proxy``
    (lower case first, then upper case; a value without a scheme is ``http://``), unless
    ``no_proxy`` matches the host (``*``, a host, a domain suffix, optionally ``:port``).
    """
    if proxy is not None:
        return proxy
    if sys.platform not in ("win32", "darwin") and not any(name[-6:].lower() == "_proxy" for name in os.environ):
        # Elsewhere urllib reads only these variables: with none set there is no proxy, and
        # urllib.request (10 ms of import, 2.4 MB of RSS: http.client, email) is not needed.
        return None
    import urllib.request

    proxies = urllib.request.getproxies()
    parts = urlsplit(url)
    # Undocumented but long-standing (requests uses it too); typeshed leaves it out.
    if proxies.get("no") and urllib.request.proxy_bypass_environment(parts.netloc, proxies):  # type: ignore[attr-defined]
        return None
    found = proxies.get(parts.scheme) or proxies.get("all")
    if not found:
        return None
    found = found if "://" in found else "http://" + found
    if not found.startswith(PROXY_SCHEMES):
        logger.warning(LOG_PROXY_UNSUPPORTED, found)
        return None
    return found


def trust_store() -> tuple[str | None, str | None]:
    """(CA file, CA directory) as httpx picks them: ``SSL_CERT_FILE``, ``SSL_CERT_DIR``, else certifi."""
    if os.environ.get("SSL_CERT_FILE"):
        return os.environ["SSL_CERT_FILE"], None
    if os.environ.get("SSL_CERT_DIR"):
        return None, os.environ["SSL_CERT_DIR"]
    import certifi  # only once TLS is needed: ~5 ms of import a plain-HTTP process never pays

    return certifi.where(), None


def tls_context() -> ssl.SSLContext:
    """A verifying client context with :func:`trust_store`'s CAs, offering HTTP/1.1 only."""
    import ssl

    cafile, capath = trust_store()
    context = ssl.create_default_context(cafile=cafile, capath=capath)
    context.set_alpn_protocols(["http/1.1"])
    return context


class Route:
    """Where a client's requests go and how: target, proxy, tunnel, TLS, ``Host``.

    Every request of a client goes to one origin (``api_url``), so all this is worked out
    once, not per request.
    """

    __slots__ = (
        "connect_host",
        "connect_port",
        "host",
        "host_header",
        "origin_length",
        "port",
        "proxy",
        "proxy_authorization",
        "proxy_tls",
        "tls",
        "tunnel",
    )

    def __init__(self, base_url: str, proxy: str | None) -> None:
        parts = urlsplit(base_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.rpartition("@")[2].encode("idna" if not parts.netloc.isascii() else "ascii")
        self.origin_length = len(f"{parts.scheme}://{parts.netloc}")
        self.proxy = proxy_for(base_url, proxy)
        self.proxy_authorization: bytes | None = None
        self.proxy_tls = False
        self.connect_host, self.connect_port = self.host, self.port
        if self.proxy is not None:
            via = urlsplit(self.proxy)
            self.proxy_tls = via.scheme == "https"
            self.connect_host = via.hostname or ""
            self.connect_port = via.port or (443 if self.proxy_tls else 80)
            if via.username is not None:  # percent-encoded in the URL, as curl reads it
                pair = f"{unquote(via.username)}:{unquote(via.password or '')}".encode()
                self.proxy_authorization = b"Basic " + base64.b64encode(pair)
        #: Through a proxy, https:// goes in a CONNECT tunnel; http:// is sent to the proxy
        #: with the full URL as the request target (and the proxy's credentials).
        self.tunnel = self.proxy is not None and self.tls

    def target(self, url: str) -> bytes:
        """The request target for ``url``: its path, or the whole URL to a plain proxy."""
        if self.proxy is not None and not self.tunnel:
            return url.encode("ascii")
        return url[self.origin_length :].encode("ascii") or b"/"

    def request_headers(self, headers: list[tuple[bytes, bytes]], length: int | None) -> list[tuple[bytes, bytes]]:
        """``Host``, then ``headers``, then ``Content-Length`` (and proxy credentials outside a tunnel)."""
        out = [(b"Host", self.host_header), *headers]
        if length is not None:
            out.append((b"Content-Length", b"%d" % length))
        if self.proxy_authorization is not None and not self.tunnel:
            out.append((b"Proxy-Authorization", self.proxy_authorization))
        return out

    def connect_headers(self) -> list[tuple[bytes, bytes]]:
        """The ``CONNECT`` request's headers: the proxy's credentials go here, never to Koala."""
        target = b"%s:%d" % (self.host.encode("idna"), self.port)
        headers = [(b"Host", target)]
        if self.proxy_authorization is not None:
            headers.append((b"Proxy-Authorization", self.proxy_authorization))
        return headers

    def connect_target(self) -> bytes:
        return b"%s:%d" % (self.host.encode("idna"), self.port)


def encode_headers(request: Request) -> list[tuple[bytes, bytes]]:
    """A request's headers as bytes: the text ``_request`` built goes out as UTF-8."""
    return [(name.encode("ascii"), value.encode("utf-8")) for name, value in request.headers.items()]
