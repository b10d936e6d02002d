"""A plain WSGI app behind ``KoalaWSGIMiddleware`` for the fault tests (gunicorn).

``/track?n=1&sleep=0.05`` tracks one event (after sleeping, to spread load over workers);
``/stats`` and ``/flush?timeout=10`` answer this process's ``client.stats`` as JSON.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from koala_middleware.wsgi import ENVIRON_KEY, KoalaWSGIMiddleware
from tests.e2e.apps.faults_common import client_from_env, stats_json, track

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

client = client_from_env()


def plain_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    query = dict(parse_qsl(environ.get("QUERY_STRING", "")))
    path = environ.get("PATH_INFO", "/")
    if path == "/track":
        track(client, environ[ENVIRON_KEY], query)
        if "sleep" in query:
            time.sleep(float(query["sleep"]))
        body = b"tracked"
    elif path in ("/stats", "/flush"):
        body = stats_json(client, float(query.get("timeout", "10")) if path == "/flush" else None)
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


app = KoalaWSGIMiddleware(plain_app, client=client)
