"""Koala's browser pixel served first-party, through the app (the ``pixel_path`` option).

Only the settings and the snippet are imported here; the proxies (and httpx, websockets)
are imported when a middleware turns the proxy on.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from ._settings import DEFAULT_API_URL, DEFAULT_CDN_URL, PixelSettings
from ._snippet import pixel_snippet

if TYPE_CHECKING:
    from ._asgi import ASGIPixelProxy
    from ._wsgi import WSGIPixelProxy

__all__ = [
    "DEFAULT_API_URL",
    "DEFAULT_CDN_URL",
    "PixelSettings",
    "asgi_proxy",
    "egress_proxy",
    "pixel_snippet",
    "require_extra",
    "wsgi_proxy",
]


def egress_proxy(client: Any) -> str | None:
    """The ``proxy=`` the Koala client was given (None: the environment's applies)."""
    settings = getattr(getattr(client, "_sender", None), "settings", None)
    return getattr(settings, "proxy", None)


def require_extra(*modules: str) -> None:
    """Say at the call site, when ``pixel_path`` is set, what the proxy needs installed."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"pixel_path needs {' and '.join(missing)}, which the default install does not carry: "
            "pip install 'koala-middleware[pixel]'"
        )


def wsgi_proxy(settings: PixelSettings | None, client: Any) -> WSGIPixelProxy | None:
    if settings is None:
        return None
    require_extra("httpx")
    from ._wsgi import WSGIPixelProxy

    return WSGIPixelProxy(settings, egress_proxy(client))


def asgi_proxy(settings: PixelSettings | None, client: Any) -> ASGIPixelProxy | None:
    if settings is None:
        return None
    require_extra("httpx", "anyio")  # websockets is looked for on the first WebSocket
    from ._asgi import ASGIPixelProxy

    return ASGIPixelProxy(settings, egress_proxy(client))
