"""The way out to Koala, for the egress tests: a real forward proxy process (proxy.py) and a
local TLS collector whose CA is made here (trustme), trusted through ``SSL_CERT_FILE``.

The proxy resolves ``*.invalid`` to the loopback (``e2e/proxy_hosts.py``), so a request to
``koala.invalid`` that arrives went through it.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import trustme

from e2e.servers import Server, free_port, serve
from koala_middleware.testing import Collector

PROXY_VARIABLES = ["http_proxy", "https_proxy", "all_proxy", "no_proxy"]


def proxy_process(*options: str) -> AbstractContextManager[Server]:
    """proxy.py on a free loopback port, one worker, with proxy.py's ``options`` added."""
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


def clear_egress_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy or trust store from the caller's environment: each test sets its own."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)  # CGI: urllib ignores HTTP_PROXY there
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


@contextmanager
def tls_collector_with_ca(ca_directory: Path) -> Iterator[tuple[Collector, Path]]:
    """A collector serving HTTPS for ``koala.invalid`` and ``127.0.0.1``, and the path of the
    test CA's PEM file (in ``ca_directory``) that signed its certificate."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("koala.invalid", "127.0.0.1").configure_cert(server_context)
    ca_file = ca_directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with Collector(tls=server_context) as collector:
        yield collector, ca_file
