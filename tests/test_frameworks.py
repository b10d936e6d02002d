"""The middlewares under the frameworks users bring, each real, through its own test client:
Litestar (``DefineMiddleware``), Quart, Falcon, and mounted apps (``exclude_paths`` relative
to where the app is mounted: Starlette's ``Mount``, a WSGI app under ``SCRIPT_NAME``)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from koala_middleware import KoalaASGIMiddleware, KoalaClient, KoalaWSGIMiddleware, Tracker, current_tracker
from koala_middleware.asgi import _path
from koala_middleware.testing import Collector

UA = "Mozilla/5.0 (Macintosh) Safari/605.1.15 frameworks-test"
HOST = {"Host": "app.example.com", "User-Agent": UA}


def ko_id_cookies(set_cookies: list[str]) -> list[str]:
    return [c for c in set_cookies if c.startswith("ko_id=")]


def events(client: KoalaClient, collector: Collector) -> list[str]:
    assert client.flush(5)
    return [e["event"] for e in collector.events()]


def test_litestar_define_middleware_cookie_tracker_delivery_and_shutdown_flush(collector: Collector) -> None:
    from litestar import Litestar, Request, get
    from litestar.middleware import DefineMiddleware
    from litestar.testing import TestClient

    client = KoalaClient("pk_test", api_url=collector.url)
    collector.slow(0.5)  # the batch is still on its way when the app shuts down

    @get("/signup")
    async def signup(request: Request[Any, Any, Any]) -> dict[str, str]:
        koala: Tracker = request.state.koala
        assert current_tracker() is koala
        koala.identify("ada@example.com")
        koala.track("Signed Up")
        return {"ko_id": str(koala.profile_id)}

    @get("/pricing", sync_to_thread=True)
    def pricing() -> str:  # a sync handler in Litestar's thread pool
        current_tracker().track("Viewed Pricing")  # type: ignore[union-attr]
        return "pricing"

    app = Litestar(
        [signup, pricing],
        middleware=[DefineMiddleware(KoalaASGIMiddleware, client=client, exclude_paths=["/healthz"])],
        # Litestar answers lifespan itself (the middleware never sees it): flush from its hook. Not
        # ``on_shutdown=[client.shutdown]``: Litestar passes the app to a hook that takes an argument.
        on_shutdown=[lambda: client.shutdown()],
    )
    with TestClient(app) as http:
        response = http.get("/signup", headers=HOST)
        [cookie] = ko_id_cookies(response.headers.get_list("set-cookie"))
        assert cookie.startswith(f"ko_id={response.json()['ko_id']};") and "Domain=example.com" in cookie
        returning = {**HOST, "Cookie": f"ko_id={response.json()['ko_id']}"}
        assert http.get("/pricing", headers=returning).text == "pricing"
        assert collector.requests() == []  # precondition: pending at shutdown
    batches = collector.batches()
    assert {b["profile_id"] for b in batches} == {response.json()["ko_id"]}
    assert sorted(e["event"] for b in batches for e in b["events"]) == ["Signed Up", "Viewed Pricing"]
    assert client.stats.delivered == 2


def test_quart(client: KoalaClient, collector: Collector) -> None:
    from quart import Quart, request

    app = Quart(__name__)
    app.asgi_app = KoalaASGIMiddleware(app.asgi_app, client=client)  # type: ignore[method-assign]

    @app.post("/signup")
    async def signup() -> dict[str, str]:
        koala: Tracker = request.scope["koala.tracker"]
        assert current_tracker() is koala
        koala.identify((await request.form)["email"])
        koala.track("Signed Up")
        return {"ko_id": str(koala.profile_id)}

    async def scenario() -> None:
        http = app.test_client()
        response = await http.post("/signup", form={"email": "grace@example.com"}, headers=HOST)
        [cookie] = ko_id_cookies(response.headers.getlist("set-cookie"))
        assert cookie.startswith(f"ko_id={(await response.get_json())['ko_id']};") and "Domain=example.com" in cookie

    import asyncio

    asyncio.run(scenario())
    assert events(client, collector) == ["Signed Up"]
    assert collector.batches()[0]["email"] == "grace@example.com"


def test_falcon(client: KoalaClient, collector: Collector) -> None:
    import falcon
    import falcon.testing

    class Signup:
        def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
            koala: Tracker = req.env["koala.tracker"]
            assert current_tracker() is koala
            koala.identify(req.get_media()["email"])
            koala.track("Signed Up")
            resp.media = {"ko_id": koala.profile_id}

    app = falcon.App()
    app.add_route("/signup", Signup())
    http = falcon.testing.TestClient(KoalaWSGIMiddleware(app, client=client))
    response = http.simulate_post("/signup", json={"email": "linus@example.com"}, headers=HOST)
    # Falcon's test result keeps one header per name; its cookies keep them all.
    cookie, copy = response.cookies["ko_id"], response.cookies["ko_id_server"]
    assert cookie.value == copy.value == response.json["ko_id"] and cookie.domain == copy.domain == "example.com"
    assert copy.http_only and not cookie.http_only
    assert events(client, collector) == ["Signed Up"]


def test_exclude_paths_on_a_mounted_starlette_app_are_relative_to_the_mount(client: KoalaClient) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    seen: list[str] = []

    def consent(info: Any) -> bool:
        seen.append(info.path)
        return True

    async def page(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"enabled={request.state.koala.enabled}")

    inner = Starlette(routes=[Route("/healthz", page), Route("/page", page)])
    sub = KoalaASGIMiddleware(inner, client=client, exclude_paths=["/healthz"], should_track=consent)
    http = TestClient(Starlette(routes=[Mount("/sub", app=sub)]))
    health = http.get("/sub/healthz")
    assert health.text == "enabled=False" and "set-cookie" not in health.headers
    page_response = http.get("/sub/page")
    assert page_response.text == "enabled=True" and "ko_id=" in page_response.headers["set-cookie"]
    assert seen == ["/page"]  # should_track sees the path the app routes on too


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/sub/healthz", "/sub", "/healthz"),
        ("/sub", "/sub", "/"),
        ("/sub/", "/sub/", "/"),
        ("/subway/healthz", "/sub", "/subway/healthz"),  # not under the root: as it is
        ("/healthz", "/sub", "/healthz"),  # servers that already strip the root
        ("/healthz", "", "/healthz"),
    ],
)
def test_the_asgi_path_is_relative_to_root_path(path: str, root_path: str, expected: str) -> None:
    assert _path({"path": path, "root_path": root_path}) == expected


def test_exclude_paths_under_a_wsgi_script_name_prefix(client: KoalaClient) -> None:
    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    from werkzeug.test import Client
    from werkzeug.wrappers import Response

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        tracker = environ["koala.tracker"]
        return Response(f"{environ['SCRIPT_NAME']} {environ['PATH_INFO']} enabled={tracker.enabled}")(
            environ, start_response
        )

    not_found = Response("no", status=404)
    sub = KoalaWSGIMiddleware(app, client=client, exclude_paths=["/healthz"])
    mounted = DispatcherMiddleware(not_found, {"/sub": sub})
    http = Client(mounted)
    health = http.get("/sub/healthz")
    assert health.text == "/sub /healthz enabled=False" and "Set-Cookie" not in health.headers
    page = http.get("/sub/page")
    assert page.text == "/sub /page enabled=True" and page.headers["Set-Cookie"].startswith("ko_id=")
