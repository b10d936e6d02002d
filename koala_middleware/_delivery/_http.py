"""Posting one batch to Koala and reading the answer: the sender's HTTP layer.

The background sender posts with aiohttp, chosen by measurement (``bench/delivery.py``):
per request it costs about a quarter of the CPU of the sharded httpx transports used
before, with the same guarantees. One ``ClientSession`` over one ``TCPConnector`` keeps up
to ``max_in_flight`` connections alive; ``timeout`` is a deadline for the whole attempt
(connect, send, and the answer to its last byte); at most ``BODY_CAP`` bytes of an answer
are read and the connection is dropped past them. Proxies come from ``proxy=`` or else
from the environment, resolved as curl and ``httpx.Client(trust_env=True)`` do, and TLS is
verified with httpx's trust store (certifi, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``).

httpx stays where it keeps things simple: ``sync=True`` (``httpx.Client``, which honours
the same environment) and the ``transport=`` hook for tests (``httpx.MockTransport``).
"""

from __future__ import annotations

import base64
import logging
import ssl
import urllib.request
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiohttp
import httpx
import yarl

from ._policy import Answer
from ._request import Request
from ._settings import PROXY_SCHEMES, DeliverySettings

logger = logging.getLogger("koala_middleware")

LOG_PROXY_UNSUPPORTED = "ignoring the proxy %r from the environment: only http:// and https:// proxies are supported"

#: How much of an answer's body is read: Koala's answers are a few bytes of JSON, and an
#: excerpt for the logs needs no more. Past it the connection is dropped, not drained, so a
#: huge answer costs neither memory nor time.
BODY_CAP = 4096

#: Seconds an idle kept-alive connection is kept: httpx's default, well under the idle
#: timeouts of load balancers, so a connection is rarely closed under a request.
KEEPALIVE = 5.0


class Poster(Protocol):
    """Posts one request, returns Koala's answer (or raises: network errors, timeouts)."""

    async def __call__(self, request: Request) -> Answer: ...

    async def close(self) -> None: ...


def poster(settings: DeliverySettings) -> Poster:
    """The background sender's poster; call it on the sender's loop."""
    if isinstance(settings.transport, httpx.AsyncBaseTransport):
        return TransportPoster(settings, settings.transport)
    return SessionPoster(settings)


def proxy_for(url: str, proxy: str | None = None) -> str | None:
    """The proxy to reach ``url`` through: ``proxy`` if given, else the environment's.

    As curl and ``httpx.Client(trust_env=True)``: ``<scheme>_proxy`` then ``all_proxy``
    (lower case first, then upper case; a value without a scheme is ``http://``), unless
    ``no_proxy`` matches the host (``*``, a host, a domain suffix, optionally ``:port``).
    """
    if proxy is not None:
        return proxy
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


def ssl_context(settings: DeliverySettings) -> ssl.SSLContext:
    """TLS verified as httpx does (certifi, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``).

    Built once: it costs about 20 ms of CPU. Over plain http:// it is never used, so a
    bare one (under a millisecond) does.
    """
    if settings.base_url.startswith("https:") or (settings.proxy or "").startswith("https:"):
        return httpx.create_ssl_context()
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def split_credentials(proxy: str | None) -> tuple[str | None, dict[str, str] | None]:
    """A proxy URL without its ``user:password@`` part, and the header carrying them."""
    parts = urlsplit(proxy) if proxy else None
    if parts is None or parts.username is None:
        return proxy, None
    credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    bare = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
    return bare, {"Proxy-Authorization": "Basic " + base64.b64encode(credentials).decode()}


class SessionPoster:
    """aiohttp: one session, kept-alive connections, a deadline per attempt, capped answers."""

    def __init__(self, settings: DeliverySettings) -> None:
        context = ssl_context(settings)
        self._proxy, authorization = split_credentials(proxy_for(settings.base_url, settings.proxy))
        # Proxy-Authorization goes on the CONNECT request for https (never through the
        # tunnel to Koala), on each request through an http proxy otherwise.
        tunnel = settings.base_url.startswith("https:")
        self._proxy_headers = authorization if tunnel else None
        session_headers = authorization if authorization and not tunnel else {}
        connector = aiohttp.TCPConnector(
            limit=max(1, settings.max_in_flight), limit_per_host=0, keepalive_timeout=KEEPALIVE, ssl=context
        )
        self._urls: dict[str, yarl.URL] = {}
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=session_headers,
            timeout=aiohttp.ClientTimeout(total=settings.timeout),
            # Nothing a post to Koala needs: cookies, decompression, Accept* headers, or the
            # environment's proxies and .netrc (resolved above, as curl does).
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("Accept", "Accept-Encoding"),
            trust_env=False,
        )

    async def __call__(self, request: Request) -> Answer:
        url = self._urls.get(request.url)
        if url is None:  # two URLs in all (/batch, /accounts/batch): parsed once each
            url = self._urls[request.url] = yarl.URL(request.url)
        async with self._session.post(
            url,
            data=request.body,
            headers=request.headers,
            proxy=self._proxy,
            proxy_headers=self._proxy_headers,
            allow_redirects=False,
        ) as response:
            length = response.content_length
            if length is not None and length <= BODY_CAP:  # Koala's usual answer: read it all
                body = await response.read()
            else:
                body = await self._read_capped(response)
            return Answer(response.status, response.headers.get("Retry-After"), body.decode("utf-8", "replace"))

    @staticmethod
    async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
        content = response.content
        body = b""
        while len(body) < BODY_CAP:
            chunk = await content.read(BODY_CAP - len(body))
            if not chunk:
                break
            body += chunk
        if not content.at_eof():
            response.close()  # more than the cap: drop the connection, never drain it
        return body

    async def close(self) -> None:
        await self._session.close()


class TransportPoster:
    """Posts straight through an httpx transport (``transport=``, e.g. a ``MockTransport``).

    The request carries what Koala reads (``Host``, ``Content-Type``, ``Content-Length``,
    ``User-Agent``), with httpx's per-request timeouts.
    """

    __slots__ = ("_extensions", "_host", "_transport")

    def __init__(self, settings: DeliverySettings, transport: httpx.AsyncBaseTransport) -> None:
        self._transport = transport
        self._host = httpx.URL(settings.base_url).netloc
        self._extensions = {"timeout": httpx.Timeout(settings.timeout).as_dict()}

    async def __call__(self, request: Request) -> Answer:
        headers = [(b"Host", self._host), (b"Content-Length", b"%d" % len(request.body))]
        headers += [(name.encode(), value.encode()) for name, value in request.headers.items()]
        outgoing = httpx.Request(
            "POST", request.url, headers=headers, stream=httpx.ByteStream(request.body), extensions=self._extensions
        )
        response = await self._transport.handle_async_request(outgoing)
        body = b""
        # The stream itself: a MockTransport's answer counts as read already. Read to its
        # end, keeping the first BODY_CAP bytes: leaving httpcore's nested async generators
        # early leaves them to be finalized on a loop that may be gone. (A transport given
        # for tests has its answer in memory anyway.)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        try:
            async for chunk in response.stream:
                if len(body) < BODY_CAP:
                    body += chunk[: BODY_CAP - len(body)]
        finally:
            await response.aclose()
        return answer(response, body)

    async def close(self) -> None:
        await self._transport.aclose()


def answer(response: httpx.Response, body: bytes) -> Answer:
    """An httpx response as an :class:`Answer`."""
    return Answer(response.status_code, response.headers.get("retry-after"), body[:BODY_CAP].decode("utf-8", "replace"))
