"""The FastAPI app that the uvicorn end-to-end tests serve.

Koala's key and URL come from ``KOALA_PUBLIC_KEY`` / ``KOALA_API_URL`` (the test's local
collector); timeouts are long enough for a deliberately slow collector. The app has a
``lifespan`` of its own, which must not stop the middleware from flushing at shutdown; it
prints a line when that lifespan's shutdown code has run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from koala_middleware import KoalaClient, current_tracker
from koala_middleware.fastapi import KoalaASGIMiddleware, KoalaTracker

client = KoalaClient(timeout=10, backoff_base=0.05, max_backoff=0.5, shutdown_timeout=10)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    print("koala-e2e: the app's lifespan shutdown ran", flush=True)


app = FastAPI(lifespan=lifespan)
app.add_middleware(KoalaASGIMiddleware, client=client)


@app.get("/visitor", response_class=PlainTextResponse)
async def visitor(koala: KoalaTracker) -> str:
    return koala.profile_id or "-"


@app.get("/track", response_class=PlainTextResponse)
async def track(koala: KoalaTracker) -> str:
    """Tracks one event and answers its message_id."""
    return koala.track("Pinged")


@app.get("/sync", response_class=PlainTextResponse)
def sync() -> str:
    """A sync handler, in the thread pool: the tracker is still current_tracker()."""
    tracker = current_tracker()
    return tracker.track("Synced") if tracker is not None else "no tracker"


@app.get("/cookies", response_class=PlainTextResponse)
async def cookies(response: Response) -> str:
    response.set_cookie("session", "abc", httponly=True)
    response.set_cookie("theme", "dark")
    return "ok"


@app.get("/stream")
async def stream(gate: str, koala: KoalaTracker) -> StreamingResponse:
    """Sends one line, then holds the response open until the test creates the gate file."""
    gate_file = Path(gate)

    async def body() -> AsyncIterator[str]:
        yield "first\n"
        deadline = time.monotonic() + 10
        while not gate_file.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        koala.track("Streamed", {"gate_seen": gate_file.exists(), "current": current_tracker() is koala})
        yield "second\n"

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/boom")
async def boom(koala: KoalaTracker) -> str:
    koala.track("Started Checkout")
    raise RuntimeError("the handler failed after tracking")
