"""The shared request lifecycle never turns a callback's or the sender's failure into a 500."""

from __future__ import annotations

import logging

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from koala_middleware import KoalaClient
from koala_middleware.asgi import KoalaASGIMiddleware


def app_with(client: KoalaClient, **options: object) -> TestClient:
    async def home(request: Request) -> PlainTextResponse:
        request.state.koala.track("Viewed Home")
        return PlainTextResponse("ok")

    app = KoalaASGIMiddleware(Starlette(routes=[Route("/", home)]), client=client, **options)
    return TestClient(app)


def test_should_track_that_raises_means_not_tracked(caplog: pytest.LogCaptureFixture) -> None:
    client = KoalaClient(dry_run=True)

    def broken(info: object) -> bool:
        raise KeyError("consent")

    caplog.set_level(logging.ERROR, logger="koala_middleware")
    response = app_with(client, should_track=broken).get("/")
    assert response.status_code == 200
    assert "set-cookie" not in response.headers
    assert list(client.dry_run_batches) == []
    assert any("should_track raised" in r.getMessage() for r in caplog.records)


def test_a_failing_hand_over_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    client = KoalaClient(dry_run=True)

    def explode(batch: object) -> None:
        raise RuntimeError("can't start new thread")

    client._send = explode  # type: ignore[method-assign]  # the sender failing is not reproducible for real
    caplog.set_level(logging.ERROR, logger="koala_middleware")
    response = app_with(client).get("/")
    assert response.status_code == 200 and response.text == "ok"
    assert any("could not hand the request's batch" in r.getMessage() for r in caplog.records)
