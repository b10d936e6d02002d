"""Posting one batch to Koala and reading the answer: the sender's HTTP layer."""

from __future__ import annotations

import ssl

import httpx

from ._request import Request
from ._settings import DeliverySettings


def transports(settings: DeliverySettings) -> list[httpx.AsyncBaseTransport]:
    """The pools batches are spread over (one httpx pool slows down as it grows)."""
    if isinstance(settings.transport, httpx.AsyncBaseTransport):
        return [settings.transport]
    per_pool = max(1, settings.connections_per_pool)
    pools = max(1, -(-settings.max_in_flight // per_pool))
    limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
    # One TLS context for all pools: each costs about 20 ms of CPU to build (with
    # verify=True every pool builds its own, even for plain HTTP). Over http:// it is
    # never used; a bare one, verifying with no CA, costs under a millisecond.
    verify = (
        httpx.create_ssl_context()
        if settings.base_url.startswith("https:")
        else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    )
    return [httpx.AsyncHTTPTransport(limits=limits, verify=verify) for _ in range(pools)]


class Poster:
    """Posts a batch straight through a transport, with what every request shares built once.

    ``httpx.AsyncClient`` would merge default headers, cookies, auth and redirects into
    each request, none of which a post to Koala needs; skipping them saves about a fifth
    of the sender's CPU per batch. The request carries what Koala reads (``Host``,
    ``Content-Type``, ``Content-Length``, ``User-Agent``; not httpx's ``Accept*`` and
    ``Connection`` defaults) and the same per-request timeouts; the response is read in
    full, so retries classify it as before. A ``transport=`` given for tests goes the
    same way.
    """

    __slots__ = ("_extensions", "_host")

    def __init__(self, settings: DeliverySettings) -> None:
        self._host = httpx.URL(settings.base_url).netloc
        self._extensions = {"timeout": httpx.Timeout(settings.timeout).as_dict()}

    async def __call__(self, transport: httpx.AsyncBaseTransport, request: Request) -> httpx.Response:
        headers = [(b"Host", self._host), (b"Content-Length", b"%d" % len(request.body))]
        headers += [(name.encode(), value.encode()) for name, value in request.headers.items()]
        outgoing = httpx.Request(
            "POST", request.url, headers=headers, stream=httpx.ByteStream(request.body), extensions=self._extensions
        )
        response = await transport.handle_async_request(outgoing)
        response.request = outgoing
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response


def declare_asyncio() -> None:
    """Tell sniffio this thread runs asyncio: httpcore and anyio ask it about 18 times a
    batch, and a thread's own answer is its cheapest lookup (some 7 µs, 1-2% of the CPU)."""
    try:
        import sniffio
    except ImportError:  # a declared dependency, but its absence must not stop delivery
        return
    sniffio.thread_local.name = "asyncio"
