"""A proxy.py plugin for the proxy tests: the proxy resolves ``*.invalid`` to the loopback.

Like a hosts file on the proxy's machine: the client cannot resolve ``koala.invalid``, so
a batch that reaches the collector under that name went through the proxy.
"""

from __future__ import annotations

from typing import Any

from proxy.http.proxy import HttpProxyBasePlugin


class LoopbackHosts(HttpProxyBasePlugin):  # type: ignore[misc]
    def resolve_dns(self, host: str, port: int) -> tuple[Any, Any]:
        return ("127.0.0.1", None) if host.endswith(".invalid") else (None, None)
