"""The upstream round trip over httpx: one pooled client per middleware, made on first use,
with the Koala client's egress proxy (or the environment's) and trust store.

``SyncUpstream`` (WSGI, Django sync) and ``AsyncUpstream`` (ASGI, Django async) both give
an :class:`Answer`: status, the filtered headers, and the body as the upstream sends it,
chunk by chunk, undecoded (a gzip answer passes through as gzip). Redirects are never
followed. Failures before the answer starts become a ``502``/``504`` answer of our own;
failures after it raise :class:`UpstreamCut` from the body: the ASGI glue then ends without
the last message and a WSGI server closes the connection, so the browser knows the answer
is incomplete (and never caches half a script). Every failure is counted and logged once a
minute.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._cache import MAX_ENTRY_BYTES, CachedAnswer, ScriptCache
from ._route import Outgoing, answer_headers
from ._settings import PixelSettings
from ._stats import PixelStats, describe

if TYPE_CHECKING:
    import httpx

__all__ = ["Answer", "AsyncAnswer", "AsyncUpstream", "SyncUpstream", "UpstreamCut", "error_answer"]


class UpstreamCut(Exception):
    """The upstream's answer broke off, or ran past the deadline, after it had started."""


ERROR_BODY = {
    400: b"Bad request\n",
    405: b"Method not allowed\n",
    413: b"Request body too large\n",
    501: b"WebSockets cannot be served by this WSGI server; serve the app over ASGI for them\n",
    502: b"Bad gateway: the upstream could not be reached\n",
    504: b"Gateway timeout: the upstream did not answer in time\n",
}


@dataclass(slots=True)
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: Iterator[bytes]
    close: Callable[[], None] = field(default=lambda: None)


@dataclass(slots=True)
class AsyncAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]


def error_answer(status: int) -> tuple[int, list[tuple[str, str]], bytes]:
    """Our own short answer: plain text, never cached, never echoing the request."""
    body = ERROR_BODY.get(status, b"Error\n")
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
    ]
    return status, headers, body


def _client_options(settings: PixelSettings, proxy: str | None) -> dict[str, Any]:
    import httpx

    return {
        "timeout": httpx.Timeout(settings.timeout, connect=settings.connect_timeout, pool=settings.connect_timeout),
        "follow_redirects": False,
        # The Koala client's proxy when it has one, else HTTPS_PROXY / NO_PROXY and the
        # trust store (SSL_CERT_FILE) from the environment, as httpx reads them.
        "proxy": proxy,
        "trust_env": proxy is None,
        "verify": httpx.create_ssl_context(trust_env=True),
        "limits": httpx.Limits(max_connections=100, max_keepalive_connections=20),
    }


def _failure(stats: PixelStats, exc: Exception) -> int:
    import httpx

    detail = describe(exc)
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        stats.failed("upstream_timeout", detail)
        return 504
    if isinstance(exc, (httpx.HTTPError, OSError)):
        stats.failed("upstream_unreachable", detail)
    else:  # a bug of ours: said with its traceback, once a minute
        stats.failed("proxy_error", detail, exc)
    return 502


def _raw(out: Outgoing) -> list[tuple[bytes, bytes]]:
    """The headers as bytes: servers hand them over as latin-1 text, and httpx would encode
    text as ASCII (failing on a UTF-8 User-Agent)."""
    return [(name.encode("latin-1"), value.encode("latin-1", "replace")) for name, value in out.headers]


class _Base:
    def __init__(self, settings: PixelSettings, proxy: str | None, stats: PixelStats) -> None:
        self.settings = settings
        self.proxy = proxy
        self.stats = stats
        self.cache = ScriptCache(settings.cache_seconds)
        self._lock = threading.Lock()

    def _headers(self, response: httpx.Response, out: Outgoing, site_host: str | None) -> list[tuple[str, str]]:
        upstream = self.settings.cdn_url if out.cdn else self.settings.api_url
        # latin-1 both ways: header bytes pass through unchanged, whatever their encoding.
        raw = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.headers.raw]
        return answer_headers(raw, site_host, self.settings.path, upstream)

    def _cached(self, out: Outgoing) -> CachedAnswer | None:
        if not out.cdn or out.method != "GET" or self.settings.cache_seconds <= 0:
            return None
        hit = self.cache.get(out.url, _accept_encoding(out))
        if hit is not None:
            self.stats.count("cache_hits")
        return hit

    def _keep(self, out: Outgoing, status: int, headers: list[tuple[str, str]]) -> float:
        if not out.cdn or out.method != "GET":
            return 0.0
        return self.cache.seconds_for(status, headers)

    def _cut(self, exc: Exception) -> UpstreamCut:
        """Count and log an answer that broke off after it had started; what the body raises."""
        self.stats.failed("upstream_cut", describe(exc))
        return UpstreamCut(type(exc).__name__)


def _accept_encoding(out: Outgoing) -> str:
    return next((value for name, value in out.headers if name == "accept-encoding"), "")


class _CacheCopy:
    """The copy of a streamed answer's body that goes into the cache once the body ends: every
    chunk while the body stays within ``MAX_ENTRY_BYTES``; a larger body streams on uncopied.
    Shared by the sync and async body streams so both keep the same."""

    __slots__ = ("_cache", "_chunks", "_headers", "_keep", "_out", "_size", "_status")

    def __init__(
        self, cache: ScriptCache, out: Outgoing, status: int, headers: list[tuple[str, str]], keep: float
    ) -> None:
        self._cache, self._out, self._status, self._headers, self._keep = cache, out, status, headers, keep
        self._chunks: list[bytes] | None = [] if keep else None
        self._size = 0

    def add(self, chunk: bytes) -> None:
        if self._chunks is not None:
            self._size += len(chunk)
            self._chunks = self._chunks if self._size <= MAX_ENTRY_BYTES else None
            if self._chunks is not None:
                self._chunks.append(chunk)

    def store(self) -> None:
        """Called once the whole body has arrived (never after a cut)."""
        if self._chunks is not None:
            answer = CachedAnswer(self._status, self._headers, b"".join(self._chunks), time.monotonic() + self._keep)
            self._cache.put(self._out.url, _accept_encoding(self._out), answer)


class SyncUpstream(_Base):
    """For WSGI and Django's sync stack: ``httpx.Client`` is thread-safe, shared by all."""

    _client: httpx.Client | None = None

    def client(self) -> httpx.Client:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    import httpx

                    client = httpx.Client(**_client_options(self.settings, self.proxy))
                    client.headers.clear()  # no httpx defaults: only what route() chose goes up
                    self._client = client
                client = self._client
        return client

    def open(self, out: Outgoing, body: bytes, site_host: str | None) -> Answer:
        hit = self._cached(out)
        if hit is not None:
            return Answer(hit.status, list(hit.headers), iter((hit.body,)))

        deadline = time.monotonic() + self.settings.timeout
        try:
            client = self.client()
            request = client.build_request(out.method, out.url, headers=_raw(out), content=body or None)
            response = client.send(request, stream=True)
        except Exception as exc:  # any failure is an answer, never an exception for the app
            status, headers, content = error_answer(_failure(self.stats, exc))
            return Answer(status, headers, iter((content,)))
        self.stats.count("proxied")
        headers = self._headers(response, out, site_host)
        keep = self._keep(out, response.status_code, headers)
        return Answer(
            response.status_code,
            headers,
            self._body(response, out, deadline, keep, headers),
            response.close,
        )

    def _body(
        self, response: httpx.Response, out: Outgoing, deadline: float, keep: float, headers: list[tuple[str, str]]
    ) -> Iterator[bytes]:

        copy = _CacheCopy(self.cache, out, response.status_code, headers, keep)
        try:
            for chunk in response.iter_raw():
                if time.monotonic() > deadline:  # counted once, by _cut() below, as on the async path
                    raise TimeoutError("the whole-answer deadline passed")
                copy.add(chunk)
                yield chunk
        except Exception as exc:
            raise self._cut(exc) from None
        finally:
            response.close()
        copy.store()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class AsyncUpstream(_Base):
    """For ASGI and Django's async stack: one ``httpx.AsyncClient``, made on first use in the
    server's event loop. The deadline covers the whole answer, headers and body."""

    _client: httpx.AsyncClient | None = None
    _loop: object = None

    def client(self) -> httpx.AsyncClient:
        # A pooled connection belongs to the event loop that opened it: a new loop (a test
        # client's, a restarted server's) gets a new client.
        loop = _running_loop()
        if self._client is None or loop is not self._loop:
            import httpx

            client = httpx.AsyncClient(**_client_options(self.settings, self.proxy))
            client.headers.clear()  # no httpx defaults: only what route() chose goes up
            self._client, self._loop = client, loop
        return self._client

    async def open(self, out: Outgoing, body: bytes, site_host: str | None) -> AsyncAnswer:
        import anyio

        hit = self._cached(out)
        if hit is not None:
            return AsyncAnswer(hit.status, list(hit.headers), _one(hit.body))
        deadline = anyio.current_time() + self.settings.timeout
        try:
            client = self.client()
            with anyio.fail_after(self.settings.timeout):
                request = client.build_request(out.method, out.url, headers=_raw(out), content=body or None)
                response = await client.send(request, stream=True)
        except Exception as exc:  # any failure is an answer, never an exception for the app
            status, headers, content = error_answer(_failure(self.stats, exc))
            return AsyncAnswer(status, headers, _one(content))
        self.stats.count("proxied")
        headers = self._headers(response, out, site_host)
        keep = self._keep(out, response.status_code, headers)
        return AsyncAnswer(response.status_code, headers, self._body(response, out, deadline, keep, headers))

    async def _body(
        self, response: httpx.Response, out: Outgoing, deadline: float, keep: float, headers: list[tuple[str, str]]
    ) -> AsyncIterator[bytes]:
        import anyio

        copy = _CacheCopy(self.cache, out, response.status_code, headers, keep)
        chunks = response.aiter_raw()
        try:
            while True:
                try:
                    with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                copy.add(chunk)
                yield chunk
        except Exception as exc:
            raise self._cut(exc) from None
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()
        copy.store()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _running_loop() -> object:
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # trio: one loop per process run
        return None


async def _one(body: bytes) -> AsyncIterator[bytes]:
    yield body
