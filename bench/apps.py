"""The apps the server benchmarks run: the same minimal app, bare or with the middleware.

Chosen by environment, so one module serves every variant::

    KOALA_BENCH_MIDDLEWARE=1 KOALA_BENCH_API_URL=http://127.0.0.1:PORT \\
        uvicorn bench.apps:asgi_app      # or: gunicorn -k gthread bench.apps:wsgi_app

``/`` answers ``ok``; ``/track`` also records an identify and an event when a tracker is
there (with the middleware), so each request hands one batch to the sender.
"""

from __future__ import annotations

import os

import flask
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from koala_middleware import KoalaClient, current_tracker
from koala_middleware.asgi import KoalaASGIMiddleware
from koala_middleware.wsgi import KoalaWSGIMiddleware

WITH_MIDDLEWARE = os.environ.get("KOALA_BENCH_MIDDLEWARE") == "1"
API_URL = os.environ.get("KOALA_BENCH_API_URL", "http://127.0.0.1:9")


def record() -> None:
    tracker = current_tracker()
    if tracker is not None:
        tracker.identify("ada@example.com", {"plan": "pro"})
        tracker.track("Created Workspace", {"seats": 3})


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def track(request: Request) -> PlainTextResponse:
    record()
    return PlainTextResponse("ok")


CLIENT = KoalaClient("pk_bench", api_url=API_URL) if WITH_MIDDLEWARE else None


asgi_app = Starlette(
    routes=[Route("/", home), Route("/track", track)],
    middleware=[Middleware(KoalaASGIMiddleware, client=CLIENT)] if CLIENT else None,
)

flask_app = flask.Flask("bench")


@flask_app.route("/")
def flask_home() -> str:
    return "ok"


@flask_app.route("/track")
def flask_track() -> str:
    record()
    return "ok"


if CLIENT:
    flask_app.wsgi_app = KoalaWSGIMiddleware(flask_app.wsgi_app, client=CLIENT)  # type: ignore[method-assign]
wsgi_app = flask_app
