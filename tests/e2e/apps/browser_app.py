"""The Starlette app that the headless-Chromium test (``tests/e2e/test_browser.py``) serves.

Koala's key and URL come from ``KOALA_PUBLIC_KEY`` / ``KOALA_API_URL`` (the test's local
collector). The middleware is configured as the README advises for a site on
``*.example.test``: ``allowed_hosts`` names the site's domain, because the Host header is
client controlled. Each page shows what the server saw (the ``Cookie`` header and the
visitor's id) so the test can compare it with what the browser keeps.
"""

from __future__ import annotations

import html

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from koala_middleware import KoalaClient
from koala_middleware.asgi import KoalaASGIMiddleware

client = KoalaClient(timeout=10, backoff_base=0.05, max_backoff=0.5, shutdown_timeout=10)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Koala browser test</title></head>
<body>
<p>Server saw Cookie: <code id="cookie-header">{cookie}</code></p>
<p>Server's visitor id: <code id="profile-id">{profile_id}</code></p>
</body></html>
"""


async def page(request: Request) -> HTMLResponse:
    tracker = request.state.koala
    tracker.track("Viewed Page", {"host": request.url.hostname or ""})
    return HTMLResponse(
        PAGE.format(
            cookie=html.escape(request.headers.get("cookie", "")),
            profile_id=html.escape(tracker.profile_id or ""),
        )
    )


async def logout(request: Request) -> HTMLResponse:
    """Koala's ``ko.reset()``, server-side: a new anonymous visitor from this response on."""
    tracker = request.state.koala
    tracker.track("Logged Out", {"host": request.url.hostname or ""})
    tracker.reset()
    return HTMLResponse(
        PAGE.format(
            cookie=html.escape(request.headers.get("cookie", "")), profile_id=html.escape(tracker.profile_id or "")
        )
    )


app = KoalaASGIMiddleware(
    Starlette(routes=[Route("/", page), Route("/logout", logout)]),
    client=client,
    allowed_hosts=["example.test"],
)
