"""A plain Starlette app behind ``KoalaASGIMiddleware`` for the fault tests (uvicorn).

The same routes as ``faults_wsgi``: ``/track?n=1``, ``/stats``, ``/flush?timeout=10``.
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from koala_middleware.asgi import KoalaASGIMiddleware
from tests.e2e.apps.faults_common import client_from_env, stats_json, track

client = client_from_env()


async def track_request(request: Request) -> Response:
    track(client, request.scope["koala.tracker"], request.query_params)
    return PlainTextResponse("tracked")


async def stats(request: Request) -> Response:
    return Response(stats_json(client), media_type="application/json")


async def flush(request: Request) -> Response:
    timeout = float(request.query_params.get("timeout", "10"))
    body = await asyncio.get_running_loop().run_in_executor(None, stats_json, client, timeout)
    return Response(body, media_type="application/json")


app = KoalaASGIMiddleware(
    Starlette(routes=[Route("/track", track_request), Route("/stats", stats), Route("/flush", flush)]),
    client=client,
)
