"""The pixel proxy's way out: the Koala client's ``proxy=``, the environment's
``HTTPS_PROXY``, and the trust store (``SSL_CERT_FILE``), with a real forward proxy process
(proxy.py, resolving ``*.invalid`` to the loopback) and a local TLS upstream (trustme CA)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from starlette.applications import Starlette
from test_proxy import proxy_process

from e2e.servers import Server
from koala_middleware import KoalaASGIMiddleware, KoalaClient, KoalaWSGIMiddleware
from koala_middleware.testing import Collector

PROXY_VARIABLES = ["http_proxy", "https_proxy", "all_proxy", "no_proxy"]


@pytest.fixture(scope="module")
def forward_proxy() -> Iterator[Server]:
    with proxy_process() as running:
        yield running


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Collector, Path]]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("koala.invalid", "127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with Collector(tls=server_context) as upstream:
        yield upstream, ca_file


def noop_app(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b"app"]


def wsgi_get(client: KoalaClient, upstream: str, path: str) -> int:
    middleware = KoalaWSGIMiddleware(noop_app, client, pixel_path="/_k", pixel_api_url=upstream, pixel_cdn_url=upstream)
    status: list[str] = []
    body = middleware(
        {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "REMOTE_ADDR": "203.0.113.7"},
        lambda s, h, e=None: status.append(s),  # type: ignore[misc]
    )
    b"".join(body)
    body.close()  # type: ignore[attr-defined]
    return int(status[0][:3])


async def asgi_get(client: KoalaClient, upstream: str, path: str) -> int:
    middleware = KoalaASGIMiddleware(
        Starlette(), client, pixel_path="/_k", pixel_api_url=upstream, pixel_cdn_url=upstream
    )
    transport = httpx.ASGITransport(app=middleware)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://app.example.test") as http:
        return (await http.get(path)).status_code


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_https_upstream_through_the_environment_proxy_trusting_ssl_cert_file(
    forward_proxy: Server, tls_upstream: tuple[Collector, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream, ca_file = tls_upstream
    upstream.clear()
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    url = f"https://koala.invalid:{upstream.port}"  # only the proxy resolves it
    assert wsgi_get(KoalaClient(dry_run=True), url, "/_k/web/projects/pk/wsgi") == 200
    [seen] = upstream.requests("/wsgi", accepted_only=False)
    assert seen.headers["host"] == f"koala.invalid:{upstream.port}"
    assert seen.headers["x-forwarded-for"] == "203.0.113.7"


@pytest.mark.anyio
async def test_asgi_https_upstream_through_the_client_proxy_option(
    forward_proxy: Server, tls_upstream: tuple[Collector, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream, ca_file = tls_upstream
    upstream.clear()
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # the client's proxy= wins over it
    client = KoalaClient(dry_run=True, proxy=forward_proxy.url)
    url = f"https://koala.invalid:{upstream.port}"
    assert await asgi_get(client, url, "/_k/web/projects/pk/asgi") == 200
    assert upstream.requests("/asgi", accepted_only=False)


def test_tls_is_verified(tls_upstream: tuple[Collector, Path], caplog: pytest.LogCaptureFixture) -> None:
    upstream, _ = tls_upstream
    url = f"https://127.0.0.1:{upstream.port}"  # a certificate no trusted CA signed
    assert wsgi_get(KoalaClient(dry_run=True), url, "/_k/web/projects/pk/untrusted") == 502
    assert not upstream.requests("/untrusted", accepted_only=False)
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
