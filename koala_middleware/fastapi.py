"""Koala for FastAPI: the request's tracker as a handler parameter.

::

    from koala_middleware.fastapi import KoalaASGIMiddleware, KoalaTracker

    app.add_middleware(KoalaASGIMiddleware, client=client)

    @app.post("/signup")
    async def signup(form: SignUp, koala: KoalaTracker) -> str:
        koala.identify(form.email)
        koala.track("Signed Up")
        return "welcome"

The middleware makes the tracker; this module only hands it to FastAPI's dependency
injection. ``request.state.koala`` and ``current_tracker()`` are the same object. Only this
module needs FastAPI.
"""

from __future__ import annotations

from typing import Annotated

try:
    from fastapi import Depends
    from starlette.requests import HTTPConnection
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("koala_middleware.fastapi needs FastAPI: pip install 'koala-middleware[fastapi]'") from exc

from ._tracker import Tracker
from .asgi import SCOPE_KEY, VISITOR_ID_KEY, KoalaASGIMiddleware

__all__ = ["KoalaASGIMiddleware", "KoalaTracker", "get_tracker"]


async def get_tracker(connection: HTTPConnection) -> Tracker:
    """The request's tracker, as a dependency: ``koala: Tracker = Depends(get_tracker)``.

    A coroutine on purpose: FastAPI runs plain ``def`` dependencies in its thread pool, and
    a busy pool must not hold up handlers that only want their tracker. Outside dependency
    injection, use ``request.state.koala``.
    """
    tracker = connection.scope.get(SCOPE_KEY)
    if tracker is not None:
        return tracker  # type: ignore[no-any-return]
    if connection.scope["type"] == "websocket":
        raise RuntimeError(
            "websockets get no Koala tracker (they cannot set the visitor cookie); read "
            f"websocket.scope[{VISITOR_ID_KEY!r}] and record with client.tracker(profile_id=...)"
        )
    raise RuntimeError(
        "this request did not pass through the Koala middleware: add it with "
        "app.add_middleware(KoalaASGIMiddleware, client=...) (from koala_middleware.fastapi)"
    )


#: ``koala: KoalaTracker`` in a handler or dependency's parameters.
KoalaTracker = Annotated[Tracker, Depends(get_tracker)]
