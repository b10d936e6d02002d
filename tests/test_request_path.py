"""The request path's shortcut for the usual response: no cookie pending, no start_response().

A returning visitor's response goes out without the tracker being asked (see
``asgi._ASGIVisit.send_with_cookies``); these check that it is still a response start for every rule that
depends on one: ``reset()`` works before it and refuses after it, through WSGI, ASGI and
Django alike, and the response's own headers are passed on as they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from koala_middleware import KoalaClient
from koala_middleware.asgi import SCOPE_KEY, KoalaASGIMiddleware
from koala_middleware.wsgi import ENVIRON_KEY, KoalaWSGIMiddleware

HOST = "www.example.com"
VISITOR = "0f8fad5b-d9cb-4980-b0f2-4b2a1c6f5d3e"
RETURNING = f"ko_id={VISITOR}; ko_id_server={VISITOR}"
APP_HEADERS = [("Content-Type", "text/plain"), ("Set-Cookie", "theirs=1"), ("Cache-Control", "no-store")]


@pytest.fixture
def client() -> Iterator[KoalaClient]:
    client = KoalaClient("pk_test", dry_run=True)
    yield client
    client.shutdown(0)


def _wsgi(client: KoalaClient, reset_before: bool) -> tuple[list[tuple[str, str]], list[Exception]]:
    late: list[Exception] = []
    seen: list[list[tuple[str, str]]] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        if reset_before:
            environ[ENVIRON_KEY].reset()
        start_response("200 OK", list(APP_HEADERS))
        yield b"ok"
        try:
            environ[ENVIRON_KEY].reset()
        except RuntimeError as exc:
            late.append(exc)

    environ = {"PATH_INFO": "/", "HTTP_HOST": HOST, "HTTP_COOKIE": RETURNING, "wsgi.url_scheme": "https"}
    body = KoalaWSGIMiddleware(app, client=client)(environ, lambda status, headers, exc_info=None: seen.append(headers))
    list(body)
    body.close()  # type: ignore[attr-defined]
    return seen[0], late


def _asgi(client: KoalaClient, reset_before: bool) -> tuple[list[tuple[str, str]], list[Exception]]:
    late: list[Exception] = []
    seen: list[dict[str, Any]] = []
    raw = [(name.lower().encode(), value.encode()) for name, value in APP_HEADERS]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if reset_before:
            scope[SCOPE_KEY].reset()
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        try:
            scope[SCOPE_KEY].reset()
        except RuntimeError as exc:
            late.append(exc)
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        seen.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "https",
        "path": "/",
        "headers": [(b"host", HOST.encode()), (b"cookie", RETURNING.encode())],
        "client": ("203.0.113.7", 5000),
    }
    asyncio.run(KoalaASGIMiddleware(app, client=client)(scope, receive, send))
    start = seen[0]
    return [(name.decode(), value.decode()) for name, value in start["headers"]], late


@pytest.mark.parametrize("call", [_wsgi, _asgi], ids=["wsgi", "asgi"])
def test_a_returning_visitor_s_response_goes_out_as_the_app_made_it(client: KoalaClient, call: Any) -> None:
    headers, late = call(client, reset_before=False)
    assert [(name.lower(), value) for name, value in headers] == [(n.lower(), v) for n, v in APP_HEADERS]
    assert len(late) == 1 and "before the response starts" in str(late[0])


@pytest.mark.parametrize("call", [_wsgi, _asgi], ids=["wsgi", "asgi"])
def test_reset_before_the_response_starts_still_sets_the_new_id(client: KoalaClient, call: Any) -> None:
    headers, _ = call(client, reset_before=True)
    ours = [value for name, value in headers if name.lower() == "set-cookie" and value.startswith("ko_id")]
    assert len(ours) == 2, headers  # the new id and its server-kept copy
    assert all(VISITOR not in value for value in ours)
    assert ("Set-Cookie", "theirs=1") in headers or ("set-cookie", "theirs=1") in headers
