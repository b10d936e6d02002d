"""Identity as Koala's pixel sees it (issue 15), through real Flask and Starlette apps.

The ids the pixel or Koala's server may have written are kept as written; the server-kept
copy of the id (HttpOnly, for Safari's 7-day cap on cookies written by JavaScript) restores
an expired ``ko_id``; ``account()`` links the person to the company; ``reset()`` starts a new
anonymous visitor at logout; a new visitor whose cookie never reaches the browser is not sent
under an id no browser holds. Each case runs on both stacks from one handler body, with the
local collector as Koala.
"""

from __future__ import annotations

import json
import logging
import re
import string
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI
from flask import Flask, Response
from flask import request as flask_request
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route

with warnings.catch_warnings():  # recent Starlette asks for httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from koala_middleware import KoalaClient, Tracker
from koala_middleware.asgi import KoalaASGIMiddleware
from koala_middleware.fastapi import KoalaTracker
from koala_middleware.flask import Koala
from koala_middleware.testing import Collector
from koala_middleware.wsgi import ENVIRON_KEY, KoalaWSGIMiddleware

UA = "Mozilla/5.0 (Macintosh) Safari/605.1.15 koala-identity-test"
HOST = "www.example.com"
VISITOR = "0b6f3c1e-2d4a-4f5b-8c7d-9e0f1a2b3c4d"
OTHER = "7d0c5b3a-1f2e-4d3c-9b8a-6f5e4d3c2b1a"
COPY = "ko_id_server"
ATTRIBUTES = "; Domain=example.com; Path=/; Max-Age=31536000; SameSite=Lax"
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
NANOID = "V1StGXR8_Z5jdHi6B-myT"  # 21 characters, nanoid's default alphabet
KEPT = {
    "nanoid": NANOID,
    "uuid4-upper": VISITOR.upper(),
    "uuid1": "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
}
REPLACED = {
    "markup": "<script>alert('ko')</script>",
    "nil-uuid": "00000000-0000-0000-0000-000000000000",
    "5000-characters": "a" * 5000,
    "15-characters": "a" * 15,
}


# -- one handler body, two stacks ---------------------------------------------------------------


def handle(tracker: Tracker, path: str, arg: Callable[[str], str | None]) -> tuple[int, list[tuple[str, str]], bytes]:
    """What both apps do, by path; the body tells what the handler saw."""
    seen: dict[str, Any] = {"before": tracker.profile_id}
    if path == "/account":
        tracker.identify("ada@acme.com")
        tracker.account("acme.com", {"plan": "pro"}, group_id="g1")
    elif path == "/logout":
        tracker.identify("ada@acme.com")
        tracker.track("Before Reset")
        tracker.reset()
        tracker.track("After Reset")
    else:
        if arg("email"):
            tracker.identify(arg("email"))
        tracker.track("Viewed Page", {"path": path})
    seen["profile_id"] = tracker.profile_id
    status = int(arg("status") or "200")
    headers = [("Cache-Control", arg("cc") or "")] if arg("cc") else []
    if status == 304:
        return status, headers, b""
    return status, [("Content-Type", "application/json"), *headers], json.dumps(seen).encode()


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def set_cookies(self) -> dict[str, str]:
        """Set-Cookie values by cookie name (each name at most once)."""
        cookies = [v for k, v in self.headers if k.lower() == "set-cookie"]
        named = {c.partition("=")[0]: c for c in cookies}
        assert len(named) == len(cookies), cookies
        return named

    def value(self, name: str = "ko_id") -> str | None:
        cookie = self.set_cookies.get(name)
        return cookie.split(";")[0].partition("=")[2] if cookie is not None else None

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


class FlaskStack:
    def __init__(self, client: KoalaClient, options: dict[str, Any]) -> None:
        app = Flask(__name__)

        @app.route("/", defaults={"path": ""})
        @app.route("/<path:path>")
        def page(path: str) -> Response:
            status, headers, body = handle(flask_request.environ[ENVIRON_KEY], "/" + path, flask_request.args.get)
            return Response(body, status, headers)

        app.wsgi_app = KoalaWSGIMiddleware(app.wsgi_app, client=client, **options)  # type: ignore[method-assign]
        self.test_client = app.test_client(use_cookies=False)

    def get(self, path: str = "/", cookie: str | None = None, **query: str) -> Reply:
        headers = [("Host", HOST), ("User-Agent", UA)] + ([("Cookie", cookie)] if cookie else [])
        with self.test_client.get(path, query_string=query, headers=headers) as response:
            return Reply(response.status_code, list(response.headers.items()), response.get_data())


class StarletteStack:
    def __init__(self, client: KoalaClient, options: dict[str, Any]) -> None:
        async def page(request: Request) -> StarletteResponse:
            status, headers, body = handle(request.state.koala, request.url.path, request.query_params.get)
            response = StarletteResponse(body, status)
            response.raw_headers.extend((k.lower().encode(), v.encode()) for k, v in headers)
            return response

        self.app = KoalaASGIMiddleware(Starlette(routes=[Route("/{path:path}", page)]), client=client, **options)

    def get(self, path: str = "/", cookie: str | None = None, **query: str) -> Reply:
        headers = [("host", HOST), ("user-agent", UA)] + ([("cookie", cookie)] if cookie else [])
        with TestClient(self.app) as test_client:  # a new client: an empty cookie jar
            response = test_client.get(path, params=query, headers=headers)
        return Reply(response.status_code, list(response.headers.multi_items()), response.content)


Stack = FlaskStack | StarletteStack


@pytest.fixture(params=["flask", "starlette"])
def make_stack(request: pytest.FixtureRequest) -> Callable[..., Stack]:
    def make(koala: KoalaClient, **options: Any) -> Stack:
        return (FlaskStack if request.param == "flask" else StarletteStack)(koala, options)

    return make


def delivered(client: KoalaClient, collector: Collector) -> list[dict[str, Any]]:
    assert client.flush(10)
    return collector.batches()


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="koala_middleware")
    return caplog


# -- ids kept as written, others replaced ---------------------------------------------------------


@pytest.mark.parametrize("visitor", list(KEPT.values()), ids=list(KEPT))
def test_ids_the_pixel_or_koala_may_have_written_are_kept_exactly_as_sent(
    make_stack: Callable[..., Stack], client: KoalaClient, collector: Collector, visitor: str
) -> None:
    stack = make_stack(client)
    both = stack.get("/both", f"ko_id={visitor}; {COPY}={visitor}")
    assert both.set_cookies == {} and both.json()["profile_id"] == visitor
    only_ko_id = stack.get("/only-ko-id", f"ko_id={visitor}")
    assert "ko_id" not in only_ko_id.set_cookies and only_ko_id.json()["profile_id"] == visitor
    assert only_ko_id.value(COPY) == visitor  # the copy is written, as sent
    assert [b["profile_id"] for b in delivered(client, collector)] == [visitor, visitor]


@pytest.mark.parametrize("forged", list(REPLACED.values()), ids=list(REPLACED))
def test_values_that_cannot_be_an_id_are_replaced_and_never_reflected(
    make_stack: Callable[..., Stack],
    client: KoalaClient,
    collector: Collector,
    debug_log: pytest.LogCaptureFixture,
    forged: str,
) -> None:
    stack = make_stack(client)
    replies = [stack.get("/forged", f"ko_id={forged}"), stack.get("/forged-copy", f"{COPY}={forged}")]
    batches = delivered(client, collector)
    for reply in replies:
        new_id = reply.value()
        assert new_id is not None and UUID4.fullmatch(new_id) and reply.value(COPY) == new_id
        assert reply.json()["profile_id"] == new_id
    assert sorted(b["profile_id"] for b in batches) == sorted(r.value() for r in replies)  # type: ignore[type-var]
    visible = [
        *(f"{k}: {v}" for r in replies for k, v in r.headers),
        *(r.body.decode() for r in replies),
        *(r.body.decode() for r in collector.requests()),
        debug_log.text,
    ]
    for text in visible:
        assert forged not in text


URL_SAFE = string.ascii_letters + string.digits + "_-"


def oracle_kept(value: str) -> bool:
    """The rule, written apart from the module's regex."""
    return 16 <= len(value) <= 64 and set(value) <= set(URL_SAFE) and value != REPLACED["nil-uuid"]


@pytest.fixture(scope="module")
def direct_apps() -> Iterator[tuple[KoalaWSGIMiddleware, KoalaASGIMiddleware, KoalaClient]]:
    """Both middlewares around trivial apps, called directly: hypothesis runs many examples."""
    dry = KoalaClient(dry_run=True)

    def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        environ[ENVIRON_KEY].track("Seen")
        start_response("200 OK", [])
        return [str(environ[ENVIRON_KEY].profile_id).encode()]

    async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["koala.tracker"].track("Seen")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(scope["koala.tracker"].profile_id).encode()})

    yield KoalaWSGIMiddleware(wsgi_app, client=dry), KoalaASGIMiddleware(asgi_app, client=dry), dry


def call_wsgi(app: KoalaWSGIMiddleware, cookie: str) -> tuple[list[str], str]:
    started: list[list[tuple[str, str]]] = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "HTTP_HOST": HOST,
        "HTTP_COOKIE": cookie,
        "wsgi.url_scheme": "http",
        "REMOTE_ADDR": "203.0.113.9",
    }
    result = app(environ, lambda status, headers, exc_info=None: started.append(headers))
    body = b"".join(result)
    result.close()  # type: ignore[attr-defined]
    return [v for k, v in started[0] if k == "Set-Cookie"], body.decode()


def call_asgi(app: KoalaASGIMiddleware, cookie: bytes) -> tuple[list[str], str]:
    import asyncio

    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "scheme": "http",
        "client": ("203.0.113.9", 1),
        "headers": [(b"host", HOST.encode()), (b"cookie", cookie)],
    }
    asyncio.run(app(scope, receive, send))
    cookies = [v.decode("latin-1") for k, v in messages[0]["headers"] if k == b"set-cookie"]
    return cookies, messages[1]["body"].decode()


@given(
    st.text(alphabet=URL_SAFE, min_size=10, max_size=70)
    | st.uuids().map(str)
    | st.uuids().map(lambda u: str(u).upper())
    | st.text(alphabet=URL_SAFE + "<>\"' .%é", min_size=10, max_size=70)
)
@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_property_an_id_is_kept_as_written_iff_the_rule_allows_it_and_never_echoed_otherwise(
    direct_apps: tuple[KoalaWSGIMiddleware, KoalaASGIMiddleware, KoalaClient], value: str
) -> None:
    wsgi_app, asgi_app, dry = direct_apps
    header = f"theme=dark; ko_id={value}"
    value = value.strip(" ")  # the white space around a cookie value is not part of it (RFC 6265)
    for call in (lambda: call_wsgi(wsgi_app, header), lambda: call_asgi(asgi_app, header.encode("utf-8"))):
        cookies, profile_id = call()
        batch = dry.dry_run_batches[-1].body.decode()
        if oracle_kept(value):
            assert profile_id == value and json.loads(batch)["profile_id"] == value
            assert [c.partition("=")[0] for c in cookies] == [COPY]  # ko_id untouched
        else:
            assert UUID4.fullmatch(profile_id) and value not in profile_id
            assert [c.partition("=")[0] for c in cookies] == ["ko_id", COPY]
            assert {c.split(";")[0].partition("=")[2] for c in cookies} == {profile_id}
            assert json.loads(batch)["profile_id"] == profile_id
            if len(value) >= 20:  # shorter ones may match the fixed text by chance ("profile_id")
                assert not any(value in c for c in cookies) and value not in batch


# -- account() links the person to the company ---------------------------------------------------


def test_account_links_the_visitor_with_dollar_account_and_still_sends_account_traits(
    make_stack: Callable[..., Stack], client: KoalaClient, collector: Collector
) -> None:
    reply = make_stack(client).get("/account", f"ko_id={VISITOR}; {COPY}={VISITOR}")
    assert reply.status == 200
    (person,) = delivered(client, collector)
    assert person["profile_id"] == VISITOR and person["email"] == "ada@acme.com"
    identify, link = person["identifies"]
    assert identify["traits"] == {"email": "ada@acme.com"}
    assert link["type"] == "identify" and link["traits"]["$account"] == {
        "domain": "acme.com",
        "group_id": "g1",
        "plan": "pro",
    }
    assert list(link["traits"]["$account"]) == ["domain", "group_id", "plan"]  # as Koala's docs write it
    (account,) = collector.account_batches()
    assert account == {
        "domain": "acme.com",
        "identifies": [{"type": "identify", "traits": {"plan": "pro", "group_id": "g1"}}],
    }


def test_account_link_is_one_identify_per_call_and_can_be_left_out() -> None:
    client = KoalaClient(dry_run=True)
    with client.tracker(profile_id=VISITOR) as tracker:
        tracker.account("acme.com", {"domain": "evil.com", "group_id": "x"}, group_id="g1")
        tracker.account("acme.com", group_id="g2")
        tracker.account("other.com")
        tracker.account("synced.com", {"plan": "free"}, link=False)
    person, *accounts = client.dry_run_batches
    assert [i["traits"]["$account"] for i in person.json()["identifies"]] == [
        {"domain": "acme.com", "group_id": "g1"},  # the traits cannot redirect the link
        {"domain": "acme.com", "group_id": "g2"},
        {"domain": "other.com"},
    ]
    assert sorted(a.json()["domain"] for a in accounts) == ["acme.com", "synced.com"]


# -- reset() ------------------------------------------------------------------------------------


def check_reset(reply: Reply, batches: list[dict[str, Any]], old: str) -> None:
    new = reply.value()
    assert new is not None and UUID4.fullmatch(new) and new != old
    assert reply.set_cookies["ko_id"] == f"ko_id={new}{ATTRIBUTES}"  # as a new visitor's: replaces the pixel's
    assert reply.set_cookies[COPY] == f"{COPY}={new}{ATTRIBUTES}; HttpOnly"
    assert reply.json() == {"before": old, "profile_id": new}
    events = {e["event"]: b for b in batches for e in b.get("events", [])}
    assert events["Before Reset"]["profile_id"] == old and events["Before Reset"]["email"] == "ada@acme.com"
    assert events["After Reset"]["profile_id"] == new and "email" not in events["After Reset"]


def test_reset_sends_what_came_before_under_the_old_id_and_starts_a_new_visitor(
    make_stack: Callable[..., Stack], client: KoalaClient, collector: Collector
) -> None:
    reply = make_stack(client).get("/logout", f"ko_id={VISITOR}; {COPY}={VISITOR}")
    check_reset(reply, delivered(client, collector), VISITOR)


def test_reset_of_a_new_visitor_keeps_nothing_under_the_id_no_browser_got(
    make_stack: Callable[..., Stack], client: KoalaClient, collector: Collector
) -> None:
    reply = make_stack(client).get("/logout")
    batches = delivered(client, collector)
    new = reply.value()
    # Before the reset: under the email only (the first id never left the server).
    (before,) = [b for b in batches if b["events"][0]["event"] == "Before Reset"]
    assert "profile_id" not in before and before["email"] == "ada@acme.com"
    (after,) = [b for b in batches if b["events"][0]["event"] == "After Reset"]
    assert after["profile_id"] == new == reply.json()["profile_id"] and len(reply.set_cookies) == 2


def test_reset_outside_a_request_or_after_the_response_started_says_why() -> None:
    client = KoalaClient(dry_run=True)
    with pytest.raises(RuntimeError, match="reset\\(\\) works on a web request's tracker"):
        client.tracker(email="ada@acme.com").reset()
    Tracker(client, enabled=False).reset()  # not tracked: nothing to forget

    late: list[Exception] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"streaming"
        try:
            environ[ENVIRON_KEY].reset()
        except RuntimeError as exc:
            late.append(exc)

    body = KoalaWSGIMiddleware(app, client=client)({"PATH_INFO": "/", "HTTP_HOST": HOST}, lambda *a: None)
    list(body)
    body.close()  # type: ignore[attr-defined]
    assert "before the response starts" in str(late[0])


# -- a new visitor whose cookie is withheld --------------------------------------------------------


@pytest.mark.parametrize(("status", "cc"), [(200, "public, max-age=60"), (200, "s-maxage=60"), (304, None)])
def test_a_new_visitor_on_a_cacheable_response_is_not_sent_under_an_uncookied_id(
    make_stack: Callable[..., Stack],
    client: KoalaClient,
    collector: Collector,
    debug_log: pytest.LogCaptureFixture,
    status: int,
    cc: str | None,
) -> None:
    stack = make_stack(client)
    query = {"status": str(status), **({"cc": cc} if cc else {})}
    anonymous = stack.get("/cached", **query)
    identified = stack.get("/cached", email="ada@acme.com", **query)
    returning = stack.get("/cached", f"ko_id={VISITOR}", **query)
    control = stack.get("/control")  # delivered: so the empty result below means something
    for reply in (anonymous, identified, returning):
        assert reply.status == status and reply.set_cookies == {}
    batches = delivered(client, collector)
    assert {b.get("profile_id", "-") for b in batches} == {"-", VISITOR, control.value()}
    (by_email,) = [b for b in batches if "profile_id" not in b]
    assert by_email["email"] == "ada@acme.com"  # identified: sent by email, without the id
    assert [e["event"] for e in by_email["events"]] == ["Viewed Page"]
    stats = client.stats
    assert stats.events_dropped == {"cookie_withheld": 1}  # the anonymous visitor's one event
    withheld = [r for r in debug_log.records if "cookie_withheld" in r.getMessage()]
    assert withheld and all(r.levelno == logging.DEBUG for r in withheld)


# -- the server-kept copy -------------------------------------------------------------------------


def test_server_kept_copy_new_visitor_gets_both_and_a_returning_one_with_both_gets_none(
    make_stack: Callable[..., Stack], client: KoalaClient, collector: Collector
) -> None:
    stack = make_stack(client)
    new = stack.get("/new")
    visitor = new.value()
    assert visitor is not None and new.set_cookies == {
        "ko_id": f"ko_id={visitor}{ATTRIBUTES}",
        COPY: f"{COPY}={visitor}{ATTRIBUTES}; HttpOnly",
    }
    assert stack.get("/back", f"ko_id={visitor}; {COPY}={visitor}").set_cookies == {}
    assert [b["profile_id"] for b in delivered(client, collector)] == [visitor, visitor]


def test_only_the_copy_restores_ko_id_with_the_same_id_and_no_new_visitor(
    make_stack: Callable[..., Stack], client: KoalaClient, collector: Collector
) -> None:
    reply = make_stack(client).get("/after-a-week", f"theme=dark; {COPY}={VISITOR}")
    assert reply.set_cookies == {"ko_id": f"ko_id={VISITOR}{ATTRIBUTES}"}  # the pixel reads it again
    assert reply.json()["profile_id"] == VISITOR
    assert [b["profile_id"] for b in delivered(client, collector)] == [VISITOR]


def test_a_differing_copy_is_rewritten_to_the_value_of_ko_id(
    make_stack: Callable[..., Stack], client: KoalaClient, collector: Collector
) -> None:
    reply = make_stack(client).get("/pixel-changed", f"{COPY}={OTHER}; ko_id={VISITOR}")
    assert reply.set_cookies == {COPY: f"{COPY}={VISITOR}{ATTRIBUTES}; HttpOnly"}
    assert [b["profile_id"] for b in delivered(client, collector)] == [VISITOR]


def test_the_copy_follows_the_consent_and_cacheable_rules_and_can_be_renamed_or_turned_off(
    make_stack: Callable[..., Stack], dry: KoalaClient
) -> None:
    stack = make_stack(dry)
    assert stack.get("/cached", f"ko_id={VISITOR}", cc="public, max-age=60").set_cookies == {}
    assert stack.get("/not-modified", f"{COPY}={VISITOR}", status="304").set_cookies == {}
    opted_out = make_stack(dry, should_track=lambda info: False)
    assert opted_out.get("/").set_cookies == {}
    assert opted_out.get("/", f"{COPY}={VISITOR}").set_cookies == {}
    renamed = make_stack(dry, cookie_server_copy_name="site_vid").get("/")
    assert set(renamed.set_cookies) == {"ko_id", "site_vid"} and renamed.value("site_vid") == renamed.value()
    off = make_stack(dry, cookie_server_copy=False)
    assert set(off.get("/").set_cookies) == {"ko_id"}
    assert off.get("/", f"{COPY}={VISITOR}").json()["profile_id"] != VISITOR  # ignored when off


@pytest.fixture
def dry() -> KoalaClient:
    return KoalaClient(dry_run=True)


# -- reset() in each way of running the middleware -----------------------------------------------


def logout(tracker: Tracker) -> bytes:
    before = tracker.profile_id
    tracker.identify("ada@acme.com")
    tracker.track("Before Reset")
    tracker.reset()
    tracker.track("After Reset")
    return json.dumps({"before": before, "profile_id": tracker.profile_id}).encode()


RETURNING = f"ko_id={VISITOR}; {COPY}={VISITOR}"


def test_reset_in_flask_through_request_koala(client: KoalaClient, collector: Collector) -> None:
    app = Flask(__name__)
    Koala(app, client=client)

    @app.post("/logout")
    def flask_logout() -> Response:
        return Response(logout(flask_request.koala), mimetype="application/json")  # type: ignore[attr-defined]

    with app.test_client(use_cookies=False).post("/logout", headers={"Host": HOST, "Cookie": RETURNING}) as response:
        reply = Reply(response.status_code, list(response.headers.items()), response.get_data())
    check_reset(reply, delivered(client, collector), VISITOR)


def test_reset_in_fastapi_through_the_dependency(client: KoalaClient, collector: Collector) -> None:
    app = FastAPI()
    app.add_middleware(KoalaASGIMiddleware, client=client)

    @app.post("/logout")
    async def fastapi_logout(koala: KoalaTracker) -> StarletteResponse:
        return StarletteResponse(logout(koala), media_type="application/json")

    with TestClient(app) as browser:
        response = browser.post("/logout", headers={"host": HOST, "cookie": RETURNING})
    reply = Reply(response.status_code, list(response.headers.multi_items()), response.content)
    check_reset(reply, delivered(client, collector), VISITOR)


def test_reset_in_plain_wsgi_and_asgi_apps(client: KoalaClient, collector: Collector) -> None:
    def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = logout(environ[ENVIRON_KEY])
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = logout(scope["koala.tracker"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    for call, app in (
        (call_wsgi, KoalaWSGIMiddleware(wsgi_app, client=client)),
        (call_asgi, KoalaASGIMiddleware(asgi_app, client=client)),
    ):
        collector.received.clear()
        cookies, body = call(app, RETURNING if call is call_wsgi else RETURNING.encode())  # type: ignore[operator]
        reply = Reply(200, [("Set-Cookie", c) for c in cookies], body.encode())
        check_reset(reply, delivered(client, collector), VISITOR)
