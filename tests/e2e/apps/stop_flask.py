"""A Flask app with ``koala_middleware.flask.Koala`` for ``flask run`` in the stop tests.

The client comes from the environment as in ``faults_common``; ``/track?n=1`` tracks one event.
"""

from __future__ import annotations

from flask import Flask, request

from koala_middleware.flask import Koala
from tests.e2e.apps.faults_common import client_from_env, track

client = client_from_env()
app = Flask(__name__)
Koala(app, client=client)


@app.get("/track")
def track_request() -> str:
    track(client, request.koala, request.args)
    return "tracked"
