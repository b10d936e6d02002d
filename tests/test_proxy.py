"""Egress proxies and TLS, with a real forward proxy process (proxy.py) and a local TLS
collector whose CA is made here (trustme) and trusted through ``SSL_CERT_FILE``.

``api_url`` is on ``koala.invalid``, which only the proxy can resolve (see
``e2e/proxy_hosts.py``): a batch that arrives went through the proxy.
"""

from __future__ import annotations

import io
import ssl
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from e2e.servers import Server, free_port, serve
from koala_middleware import KoalaClient
from koala_middleware._check import check
from koala_middleware._delivery._engine import proxy_for
from koala_middleware.testing import Collector

#: Every engine passes the same tests (conftest.py's ``engine``).
pytestmark = pytest.mark.usefixtures("engine")

OPTIONS = {"backoff_base": 0.05, "max_backoff": 0.2, "timeout": 3.0}
PROXY_VARIABLES = ["http_proxy", "https_proxy", "all_proxy", "no_proxy"]


def proxy_process(*options: str) -> Any:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "proxy",
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-workers",
        "1",
        "--num-acceptors",
        "1",
        "--plugins",
        "e2e.proxy_hosts.LoopbackHosts",
        *options,
    ]
    return serve(args, port)


@pytest.fixture(scope="module")
def forward_proxy() -> Iterator[Server]:
    with proxy_process() as running:
        yield running


@pytest.fixture(scope="module")
def authenticating_proxy() -> Iterator[Server]:
    with proxy_process("--basic-auth", "koala:s3cr%t") as running:
        yield running


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)  # CGI: urllib ignores HTTP_PROXY there
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def dead_proxy() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def deliver_one(api_url: str, sync: bool, **options: object) -> KoalaClient:
    client = KoalaClient("pk_test", api_url=api_url, sync=sync, **{**OPTIONS, **options})  # type: ignore[arg-type]
    with client.tracker(profile_id=str(uuid.uuid4()), user_agent="UA/proxy") as tracker:
        tracker.track("Through")
    client.flush(10)
    client.shutdown(1)
    return client


modes = pytest.mark.parametrize("sync", [False, True], ids=["background", "sync"])


@modes
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"])
def test_batches_go_through_the_proxy_from_the_environment(
    forward_proxy: Server, collector: Collector, monkeypatch: pytest.MonkeyPatch, variable: str, sync: bool
) -> None:
    monkeypatch.setenv(variable, forward_proxy.url)
    client = deliver_one(f"http://koala.invalid:{collector.port}", sync)
    assert client.stats.delivered == 1
    [received] = collector.requests()
    assert received.headers["host"] == f"koala.invalid:{collector.port}"
    assert received.headers["user-agent"] == "UA/proxy"


@modes
@pytest.mark.parametrize("variable", ["NO_PROXY", "no_proxy"])
@pytest.mark.parametrize("rule", ["127.0.0.1", "*", "example.com, 127.0.0.1"])
def test_no_proxy_bypasses_it(
    collector: Collector, monkeypatch: pytest.MonkeyPatch, variable: str, rule: str, sync: bool
) -> None:
    monkeypatch.setenv("HTTP_PROXY", dead_proxy())
    monkeypatch.setenv(variable, rule)
    assert deliver_one(collector.url, sync).stats.delivered == 1


@modes
def test_the_proxy_option_overrides_the_environment(
    forward_proxy: Server, collector: Collector, monkeypatch: pytest.MonkeyPatch, sync: bool
) -> None:
    monkeypatch.setenv("HTTP_PROXY", dead_proxy())
    monkeypatch.setenv("ALL_PROXY", dead_proxy())
    client = deliver_one(f"http://koala.invalid:{collector.port}", sync, proxy=forward_proxy.url)
    assert client.stats.delivered == 1 and len(collector.requests()) == 1


@modes
@pytest.mark.parametrize("where", ["option", "environment"])
def test_proxy_credentials_from_the_url(
    authenticating_proxy: Server, collector: Collector, monkeypatch: pytest.MonkeyPatch, where: str, sync: bool
) -> None:
    proxy = f"http://koala:s3cr%25t@127.0.0.1:{authenticating_proxy.port}"  # percent-encoded, as in curl
    options = {"proxy": proxy} if where == "option" else {}
    if where == "environment":
        monkeypatch.setenv("HTTP_PROXY", proxy)
    client = deliver_one(f"http://koala.invalid:{collector.port}", sync, **options)
    assert client.stats.delivered == 1


@modes
def test_proxy_credentials_for_https_go_on_connect_only(
    authenticating_proxy: Server, tls_collector: tuple[Collector, Path], monkeypatch: pytest.MonkeyPatch, sync: bool
) -> None:
    koala, ca_file = tls_collector
    koala.clear()
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    proxy = f"http://koala:s3cr%25t@127.0.0.1:{authenticating_proxy.port}"
    client = deliver_one(f"https://koala.invalid:{koala.port}", sync, proxy=proxy)
    assert client.stats.delivered == 1
    assert "proxy-authorization" not in koala.requests()[0].headers, "never through the tunnel to Koala"


def test_a_proxy_refusing_without_credentials_is_counted(authenticating_proxy: Server, collector: Collector) -> None:
    client = deliver_one(f"http://koala.invalid:{collector.port}", False, proxy=authenticating_proxy.url)
    assert client.stats.delivered == 0 and client.stats.dropped == {"rejected": 1}  # 407: a setup to fix


def test_a_bad_proxy_option_is_refused_at_the_call_site() -> None:
    with pytest.raises(ValueError, match="proxy must be an http:// or https:// URL"):
        KoalaClient("pk_test", proxy="socks5://127.0.0.1:1080")


def test_proxy_resolution_follows_curl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "proxy.internal:3128")
    monkeypatch.setenv("ALL_PROXY", "http://all.internal:3128")
    assert proxy_for("https://api2.getkoala.com") == "http://proxy.internal:3128"
    assert proxy_for("http://api2.getkoala.com") == "http://all.internal:3128"
    monkeypatch.setenv("https_proxy", "http://lower.internal:3128")
    assert proxy_for("https://api2.getkoala.com") == "http://lower.internal:3128", "lower case first"
    monkeypatch.setenv("NO_PROXY", ".getkoala.com")
    assert proxy_for("https://api2.getkoala.com") is None
    assert proxy_for("https://getkoala.com.evil.test") == "http://lower.internal:3128"
    assert proxy_for("https://api2.getkoala.com", "http://explicit:1") == "http://explicit:1"


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Collector, Path]]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("koala.invalid", "127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with Collector(tls=server_context) as koala:
        yield koala, ca_file


@modes
def test_https_through_a_connect_proxy_trusting_ssl_cert_file(
    forward_proxy: Server, tls_collector: tuple[Collector, Path], monkeypatch: pytest.MonkeyPatch, sync: bool
) -> None:
    koala, ca_file = tls_collector
    koala.clear()
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    client = deliver_one(f"https://koala.invalid:{koala.port}", sync)
    assert client.stats.delivered == 1
    [received] = koala.requests()
    assert received.headers["host"] == f"koala.invalid:{koala.port}"


@modes
def test_tls_is_verified(tls_collector: tuple[Collector, Path], sync: bool) -> None:
    """Without the test CA in the trust store (certifi's), the collector's certificate fails."""
    koala, _ = tls_collector
    koala.clear()
    client = deliver_one(koala.url, sync, max_retries=0, retry_for=0)  # TLS errors are retried for retry_for otherwise
    assert client.stats.delivered == 0 and client.stats.dropped == {"retries_exhausted": 1}
    assert koala.requests(accepted_only=False) == []


def test_check_goes_through_the_same_tunnel_credentials_and_trust_store(
    authenticating_proxy: Server, tls_collector: tuple[Collector, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``koala-middleware check`` posts with the engine ``sync=True`` uses: CONNECT with the
    proxy's credentials, TLS trusting SSL_CERT_FILE, the client's User-Agent."""
    koala, ca_file = tls_collector
    koala.clear()
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.setenv("HTTPS_PROXY", f"http://koala:s3cr%25t@127.0.0.1:{authenticating_proxy.port}")
    out = io.StringIO()
    assert check("pk_test", f"https://koala.invalid:{koala.port}", None, 5.0, out) == 0, out.getvalue()
    assert "Proxy: http://koala:***@127.0.0.1" in out.getvalue()
    [received] = koala.requests()
    assert received.headers["user-agent"].startswith("koala-middleware/")
    assert "proxy-authorization" not in received.headers
