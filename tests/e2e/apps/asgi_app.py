"""A bare ASGI app (no framework) that the uvicorn end-to-end tests serve.

Koala's key and URL come from ``KOALA_PUBLIC_KEY`` / ``KOALA_API_URL`` (the test's local
collector). Like many bare apps it does not speak the lifespan protocol (it refuses every
scope but HTTP), so the middleware must answer lifespan for it to flush at shutdown.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from koala_middleware import KoalaClient
from koala_middleware.asgi import SCOPE_KEY, KoalaASGIMiddleware

Message = MutableMapping[str, Any]

client = KoalaClient(timeout=10, backoff_base=0.05, max_backoff=0.5, shutdown_timeout=10)


async def bare_app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        raise RuntimeError(f"this app serves HTTP only, not {scope['type']}")
    tracker = scope[SCOPE_KEY]
    body = tracker.track("Pinged") if scope["path"] == "/track" else tracker.profile_id or "-"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body.encode()})


app = KoalaASGIMiddleware(bare_app, client=client)
