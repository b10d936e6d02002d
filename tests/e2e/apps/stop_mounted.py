"""ASGI apps whose Koala middleware never sees lifespan, for the stop tests.

``mounted``: Starlette with ``KoalaASGIMiddleware`` on a ``Mount``ed sub-app (``/sub/track``);
``litestar``: Litestar with the middleware on one route handler (``/track``). The client
comes from the environment as in ``faults_common``.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from koala_middleware.asgi import SCOPE_KEY, KoalaASGIMiddleware
from tests.e2e.apps.faults_common import client_from_env, track

client = client_from_env()


async def track_request(request: Request) -> Response:
    track(client, request.scope[SCOPE_KEY], request.query_params)
    return PlainTextResponse("tracked")


sub_app = KoalaASGIMiddleware(Starlette(routes=[Route("/track", track_request)]), client=client)
mounted = Starlette(routes=[Mount("/sub", app=sub_app)])


def _litestar() -> Any:
    from litestar import Litestar, get
    from litestar.connection import ASGIConnection

    def koala(app: Any) -> Any:
        return KoalaASGIMiddleware(app, client=client)

    @get("/track", middleware=[koala], sync_to_thread=False)
    def track_handler(request: ASGIConnection[Any, Any, Any, Any]) -> str:
        track(client, request.scope[SCOPE_KEY], request.query_params)  # type: ignore[arg-type]
        return "tracked"

    return Litestar(route_handlers=[track_handler])


try:
    litestar = _litestar()
except ImportError:  # litestar is optional; the test that needs it skips
    litestar = None
