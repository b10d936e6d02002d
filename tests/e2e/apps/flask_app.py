"""The Flask app the gunicorn end-to-end tests serve.

Koala's key and URL come from ``KOALA_PUBLIC_KEY`` / ``KOALA_API_URL`` (the test's local
collector). Timeouts are long enough for a deliberately slow collector.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from flask import Flask, request, stream_with_context
from werkzeug.wrappers import Response

from koala_middleware import KoalaClient, current_tracker
from koala_middleware.flask import Koala

client = KoalaClient(timeout=10, backoff_base=0.05, max_backoff=0.5, shutdown_timeout=10)
app = Flask(__name__)
Koala(app, client=client)


@app.get("/pid")
def pid() -> str:
    """Which worker answered, and that worker tracks an event."""
    request.koala.track("Pinged", {"pid": os.getpid()})
    return f"{os.getpid()} {request.koala.profile_id}"


@app.get("/track")
def track() -> str:
    """Tracks one event and answers its message_id."""
    return request.koala.track("Pinged")


@app.get("/visitor")
def visitor() -> str:
    return request.koala.profile_id or "-"


@app.get("/stream")
def stream() -> Response:
    """Sends one line, then holds the response open until the test creates the gate file."""
    gate = Path(request.args["gate"])

    def body() -> Iterator[str]:
        yield "first\n"
        deadline = time.monotonic() + 10
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        koala = request.koala
        koala.track("Streamed", {"gate_seen": gate.exists(), "current": current_tracker() is koala})
        yield "second\n"

    return app.response_class(stream_with_context(body()), mimetype="text/plain")


@app.get("/boom")
def boom() -> str:
    request.koala.track("Started Checkout")
    raise RuntimeError("the handler failed after tracking")
