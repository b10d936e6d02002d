"""A bare WSGI app for gunicorn's gevent worker: every request tracks one event.

The client is made at import, so under ``--preload`` it exists in the master before the
worker's ``monkey.patch_all()``, the case that used to hang. Koala's URL comes from
``KOALA_API_URL``; short backoffs so delivery resumes soon after Koala comes back.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from koala_middleware import KoalaClient
from koala_middleware.wsgi import KoalaWSGIMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

client = KoalaClient(timeout=5, backoff_base=0.05, max_backoff=0.5, shutdown_timeout=5)


async def _answer() -> str:
    await asyncio.sleep(0)
    return "asyncio ok"


def bare(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/asyncio":
        # The sender's event loop must not count as running in the worker's thread.
        body = asyncio.run(_answer()).encode()
    else:
        environ["koala.tracker"].track("Pinged", {"pid": os.getpid()})
        body = b"ok"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


app = KoalaWSGIMiddleware(bare, client=client)
