"""The FastAPI integration: ``get_tracker`` / ``KoalaTracker``, ``request.state.koala`` and
``current_tracker()`` in real FastAPI apps under Starlette's TestClient, Koala being the local
collector; and the example app.
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import threading
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Annotated

import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Request, Response, WebSocket

from helpers import FAST_RETRIES, run_tour
from koala_middleware import KoalaClient, Tracker, current_tracker
from koala_middleware.asgi import SCOPE_KEY
from koala_middleware.fastapi import KoalaASGIMiddleware, KoalaTracker, get_tracker
from koala_middleware.testing import Collector

with warnings.catch_warnings():  # recent Starlette asks for httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fastapi_app" / "app.py"
UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0 fastapi-test"


class Boom(Exception):
    pass


async def on_loop() -> int:
    """An async dependency: runs on the event loop's thread."""
    return threading.get_ident()


def sync_dependency(koala: KoalaTracker) -> tuple[int, Tracker | None]:
    """A sync dependency: FastAPI runs it in its thread pool."""
    return threading.get_ident(), current_tracker()


def make_app(client: KoalaClient, **options: object) -> FastAPI:
    app = FastAPI()
    app.add_middleware(KoalaASGIMiddleware, client=client, **options)

    @app.get("/")
    async def home(request: Request, koala: KoalaTracker, also: Annotated[Tracker, Depends(get_tracker)]) -> str:
        assert koala is also is request.state.koala is request.scope[SCOPE_KEY] is current_tracker()
        koala.track("Viewed Home", {"path": request.url.path})
        return koala.profile_id or "-"

    @app.get("/sync")
    def sync_handler(  # FastAPI runs it (and the sync dependency) in its thread pool
        koala: KoalaTracker,
        loop_thread: Annotated[int, Depends(on_loop)],
        dependency: Annotated[tuple[int, Tracker | None], Depends(sync_dependency)],
    ) -> dict[str, bool]:
        dependency_thread, tracker_in_dependency = dependency
        current = current_tracker()
        assert current is not None
        current.track("Synced")
        return {
            "handler_off_loop": threading.get_ident() != loop_thread,
            "dependency_off_loop": dependency_thread != loop_thread,
            "handler_sees_it": current is koala,
            "dependency_sees_it": tracker_in_dependency is koala,
        }

    @app.get("/cookies")
    async def cookies(response: Response, koala: KoalaTracker) -> str:
        response.set_cookie("session", "abc", httponly=True)
        response.set_cookie("theme", "dark")
        return "ok"

    @app.post("/signup")
    async def signup(koala: KoalaTracker, tasks: BackgroundTasks) -> str:
        koala.identify("ada@example.com")
        koala.track("Signed Up")

        def welcome() -> None:
            current_tracker().track("Welcome Email Sent")  # type: ignore[union-attr]

        tasks.add_task(welcome)
        return "ok"

    @app.get("/boom")
    async def boom(koala: KoalaTracker) -> str:
        koala.track("Started Checkout")
        raise Boom("handler failed")

    @app.websocket("/ws")
    async def chat(websocket: WebSocket, koala: KoalaTracker) -> None:
        await websocket.accept()  # pragma: no cover - get_tracker refuses websockets

    return app


def test_the_dependency_request_state_and_current_tracker_are_one_tracker_whose_batch_reaches_koala(
    client: KoalaClient, collector: Collector
) -> None:
    browser = TestClient(make_app(client), headers={"User-Agent": UA}, client=("198.51.100.23", 50000))
    response = browser.get("/")
    visitor_id = response.json()
    assert response.status_code == 200 and response.cookies["ko_id"] == visitor_id
    assert browser.get("/").json() == visitor_id  # the cookie came back: same visitor
    assert collector.wait_for(2)
    bodies = collector.batches()
    assert {b["profile_id"] for b in bodies} == {visitor_id}
    assert all(b["ip"] == "198.51.100.23" and b["events"][0]["event"] == "Viewed Home" for b in bodies)
    assert {r.headers["user-agent"] for r in collector.requests()} == {UA}


def test_sync_handlers_and_sync_dependencies_in_the_thread_pool_see_the_requests_tracker(
    dry: KoalaClient,
) -> None:
    browser = TestClient(make_app(dry))
    for _ in range(3):  # each request its own tracker, never the previous one's
        assert browser.get("/sync").json() == {
            "handler_off_loop": True,
            "dependency_off_loop": True,
            "handler_sees_it": True,
            "dependency_sees_it": True,
        }
    assert [b.json()["events"][0]["event"] for b in dry.dry_run_batches] == ["Synced"] * 3


def test_response_set_cookies_survive_alongside_the_visitor_cookie(dry: KoalaClient) -> None:
    response = TestClient(make_app(dry)).get("/cookies")
    assert [c.split("=")[0] for c in response.headers.get_list("set-cookie")] == [
        "session",
        "theme",
        "ko_id",
        "ko_id_server",
    ]
    assert "HttpOnly" in response.headers.get_list("set-cookie")[0]


def test_background_tasks_track_into_the_requests_batch(dry: KoalaClient) -> None:
    assert TestClient(make_app(dry)).post("/signup").text == '"ok"'
    (batch,) = dry.dry_run_batches
    body = batch.json()
    assert body["email"] == "ada@example.com"
    assert [e["event"] for e in body["events"]] == ["Signed Up", "Welcome Email Sent"]


def test_handler_exception_propagates_unchanged_or_becomes_a_500_and_its_events_are_delivered(
    client: KoalaClient, collector: Collector
) -> None:
    app = make_app(client)
    # A returning visitor: Starlette's 500 page is made outside the middleware, without a new
    # visitor's cookie, so a new visitor's events would have no browser to belong to.
    cookies = dict(TestClient(app).get("/cookies").cookies)
    with pytest.raises(Boom, match="handler failed"):
        TestClient(app, cookies=cookies).get("/boom")
    response = TestClient(app, raise_server_exceptions=False, cookies=cookies).get("/boom")
    assert response.status_code == 500
    assert collector.wait_for(2)
    assert [e["event"] for e in collector.events()] == ["Started Checkout", "Started Checkout"]


def test_get_tracker_without_the_middleware_says_how_to_add_it() -> None:
    app = FastAPI()

    @app.get("/")
    async def home(koala: KoalaTracker) -> str:
        return "unreachable"  # pragma: no cover

    with pytest.raises(RuntimeError, match=r"app\.add_middleware\(KoalaASGIMiddleware"):
        TestClient(app).get("/")


def test_get_tracker_in_a_websocket_says_what_websockets_get_instead(dry: KoalaClient) -> None:
    with pytest.raises(RuntimeError, match=r"koala\.visitor_id"), TestClient(make_app(dry)).websocket_connect("/ws"):
        pass


def test_a_fastapi_lifespan_app_still_flushes_before_shutdown_completes() -> None:
    stopped: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        yield {"db": "connected"}
        stopped.append("app shutdown ran")

    with Collector(delay=0.5) as slow:  # each batch still pending when shutdown begins
        client = KoalaClient("pk_test", api_url=slow.url, shutdown_timeout=10, **FAST_RETRIES)
        try:
            app = FastAPI(lifespan=lifespan)
            app.add_middleware(KoalaASGIMiddleware, client=client)

            @app.post("/track")
            async def track(request: Request, koala: KoalaTracker) -> str:
                assert request.state.db == "connected"  # lifespan state and request.state.koala coexist
                return koala.track("Clicked")

            with TestClient(app) as browser:
                ids = [browser.post("/track").json() for _ in range(4)]
                assert client.stats.enqueued == 4
            assert stopped == ["app shutdown ran"]
            assert client.stats.delivered == 4 and client.stats.queued == 0
            assert sorted(e["message_id"] for e in slow.events()) == sorted(ids)
        finally:
            client.shutdown(2)


# -- packaging and the example -------------------------------------------------------------


def test_the_asgi_middleware_needs_no_starlette_and_the_fastapi_module_says_what_to_install() -> None:
    code = (
        "import asyncio, sys\n"
        "sys.modules['starlette'] = None; sys.modules['fastapi'] = None\n"
        "from koala_middleware import KoalaASGIMiddleware, KoalaClient\n"
        "async def app(scope, receive, send):\n"
        "    scope['koala.tracker'].track('Bare')\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b''})\n"
        "sent = []\n"
        "async def send(message): sent.append(message)\n"
        "async def receive(): return {'type': 'http.request'}\n"
        "client = KoalaClient(dry_run=True)\n"
        "scope = {'type': 'http', 'path': '/', 'headers': [], 'client': ('203.0.113.1', 1)}\n"
        "asyncio.run(KoalaASGIMiddleware(app, client=client)(scope, receive, send))\n"
        "print(sent[0]['headers'][0][0].decode(), client.stats.dry_run)\n"
        "try:\n"
        "    import koala_middleware.fastapi\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "set-cookie 1",
        "koala_middleware.fastapi needs FastAPI: pip install 'koala-middleware[fastapi]'",
    ]


def test_example_tour_runs_offline_and_shows_batches(tmp_path: Path) -> None:
    out = run_tour(EXAMPLE, tmp_path)
    assert "GET / -> 200; new visitor, Set-Cookie: ko_id=" in out
    assert "POST https://api2.getkoala.com/web/projects/<your public key>/batch" in out
    assert '"event": "Signed Up"' in out and '"domain": "acme-robotics.com"' in out
    assert '"event": "Upgraded Plan"' in out  # from the sync handler, through current_tracker()
    assert '"ip": "203.0.113.50"' in out and "User-Agent: Mozilla/5.0" in out
    assert "8 batches in all" in out


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("koala_fastapi_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass and FastAPI's annotations look it up there
    spec.loader.exec_module(module)
    return module


def test_example_app_sends_sign_ups_and_account_traits_to_koala(client: KoalaClient, collector: Collector) -> None:
    browser = TestClient(load_example().create_app(client), headers={"User-Agent": UA})
    form = {"name": "Grace Hopper", "email": "grace@navy-labs.com"}
    assert browser.post("/signup", data={"name": "Grace", "email": "not an email"}).status_code == 400
    assert browser.post("/upgrade", data={"plan": "team"}).status_code == 403  # not signed in
    assert browser.post("/signup", data=form, follow_redirects=False).status_code == 303
    assert (
        browser.post("/upgrade", data={"plan": "enterprise", "seats": "40"}, follow_redirects=False).status_code == 303
    )
    healthz = browser.get("/healthz")
    assert healthz.text == "ok" and "set-cookie" not in healthz.headers
    assert collector.wait_for(4)
    # Batches are posted concurrently: compare without relying on their order.
    assert sorted(e["event"] for e in collector.events()) == ["Signed Up", "Upgraded Plan"]
    signed_up = [b for b in collector.batches() if any(e["event"] == "Signed Up" for e in b.get("events", []))]
    (signup,) = signed_up
    assert signup["email"] == "grace@navy-labs.com" and signup["identifies"][0]["traits"]["name"] == "Grace Hopper"
    links = [
        i["traits"]["$account"]
        for b in collector.batches()
        for i in b.get("identifies", [])
        if "$account" in i["traits"]
    ]
    assert {"domain": "navy-labs.com", "plan": "trial", "signed_up_by": "grace@navy-labs.com"} in links
    accounts = collector.account_batches()
    assert [a["domain"] for a in accounts] == ["navy-labs.com", "navy-labs.com"]
    assert {"plan": "enterprise", "seats": 40} in [a["identifies"][0]["traits"] for a in accounts]
    page = browser.get("/").text
    assert "Grace Hopper" in page and browser.cookies["ko_id"] in page


def test_example_page_shows_the_tour_s_batches_in_dry_run_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOALA_PUBLIC_KEY", raising=False)
    example = load_example()
    example.tour(example.client)  # as main() does before serving, in dry-run mode
    page = TestClient(example.app).get("/").text
    assert "Nothing yet" not in page and "ada@acme-robotics.com" in page
