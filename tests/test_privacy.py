"""The visitor cookie's rules and the privacy controls, through both middlewares.

Every case runs twice, with one shared set of expectations: on a real Flask app
(``KoalaWSGIMiddleware`` around ``app.wsgi_app``, Flask's test client) and on a real Starlette
app (``KoalaASGIMiddleware``, Starlette's TestClient). The two apps answer alike, from one
handler body below, so a difference between the stacks shows up as a failing case. Koala is
the local collector: "nothing delivered" is checked after a flush, next to a control request
that is delivered, so that an empty result means something.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
from flask import Flask, Response
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from werkzeug.middleware.proxy_fix import ProxyFix

with warnings.catch_warnings():  # recent Starlette asks for httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from koala_middleware import KoalaClient, Tracker, _cookie
from koala_middleware._request import RequestInfo
from koala_middleware.asgi import KoalaASGIMiddleware
from koala_middleware.testing import Collector
from koala_middleware.wsgi import ENVIRON_KEY, KoalaWSGIMiddleware

UA = "Mozilla/5.0 (X11; Linux x86_64) koala-privacy-test"
VISITOR = "0b6f3c1e-2d4a-4f5b-8c7d-9e0f1a2b3c4d"
OTHER_VISITOR = "7d0c5b3a-1f2e-4d3c-9b8a-6f5e4d3c2b1a"
HOST = "www.example.com"
DEFAULT_COOKIE = "; Domain=example.com; Path=/; Max-Age=31536000; SameSite=Lax"
COPY = "ko_id_server"

Headers = Sequence[tuple[str, str]]


# -- one app, two stacks ----------------------------------------------------------------------


def handle(tracker: Tracker, path: str, args: Callable[[str], list[str]]) -> tuple[int, list[tuple[str, str]], bytes]:
    """The handler both apps run: track, try a bad call, answer as the query asks.

    ``?status=304`` picks the status; each ``?cc=...`` adds a ``Cache-Control`` header.
    The body tells what the handler saw: the tracker's id, whether it is enabled, and the
    exception a bad call raised (calls are validated even when tracking is off).
    """
    tracker.track("Viewed Page", {"path": path})
    try:
        tracker.track("")
        rejected = None
    except ValueError as exc:
        rejected = type(exc).__name__
    status = int((args("status") or ["200"])[0])
    headers = [("Cache-Control", value) for value in args("cc")]
    if status == 304:
        return status, headers, b""
    body = {"profile_id": tracker.profile_id, "enabled": tracker.enabled, "rejected": rejected}
    return status, [("Content-Type", "application/json"), *headers], json.dumps(body).encode()


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def set_cookies(self) -> list[str]:
        cookies = [value for name, value in self.headers if name.lower() == "set-cookie"]
        for cookie in cookies:  # only the server-kept copy is HttpOnly: the pixel reads ko_id
            assert ("httponly" in cookie.lower()) is cookie.startswith(COPY + "="), cookie
        return cookies

    @property
    def copy(self) -> str | None:
        """The one Set-Cookie of the server-kept copy, or None."""
        cookies = [c for c in self.set_cookies if c.startswith(COPY + "=")]
        assert len(cookies) <= 1, cookies
        return cookies[0] if cookies else None

    @property
    def cookie(self) -> str | None:
        """The one ``ko_id`` Set-Cookie, or None."""
        cookies = [c for c in self.set_cookies if c.startswith("ko_id=")]
        assert len(cookies) <= 1, cookies
        return cookies[0] if cookies else None

    @property
    def new_id(self) -> str:
        assert self.cookie is not None, "expected a new ko_id cookie"
        return self.cookie.split(";")[0].partition("=")[2]

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


class Stack(Protocol):
    def get(
        self, path: str = "/", *, query: Headers = (), headers: Headers = (), https: bool = False, host: str = HOST
    ) -> Reply: ...


class FlaskStack:
    def __init__(self, client: KoalaClient, proxy: bool, options: dict[str, Any]) -> None:
        app = Flask(__name__, static_folder=None)  # /static/... reaches the shared handler too

        @app.route("/", defaults={"path": ""})
        @app.route("/<path:path>")
        def page(path: str) -> Response:
            status, headers, body = handle(flask_request.environ[ENVIRON_KEY], "/" + path, flask_request.args.getlist)
            return Response(body, status, headers)

        koala = KoalaWSGIMiddleware(app.wsgi_app, client=client, **options)
        # The proxy fix goes outside Koala, so Koala reads the fixed scheme and address.
        app.wsgi_app = ProxyFix(koala, x_for=1, x_proto=1) if proxy else koala  # type: ignore[method-assign]
        self.test_client = app.test_client(use_cookies=False)  # cookies only as each case sends them

    def get(
        self, path: str = "/", *, query: Headers = (), headers: Headers = (), https: bool = False, host: str = HOST
    ) -> Reply:
        base_url = ("https" if https else "http") + "://localhost/"
        with self.test_client.get(
            path, query_string=list(query), headers=[("Host", host), ("User-Agent", UA), *headers], base_url=base_url
        ) as response:  # closing the response is what hands the tracker over (PEP 3333)
            return Reply(response.status_code, list(response.headers.items()), response.get_data())


class StarletteStack:
    def __init__(self, client: KoalaClient, proxy: bool, options: dict[str, Any]) -> None:
        async def page(request: Request) -> StarletteResponse:
            status, headers, body = handle(request.state.koala, request.url.path, request.query_params.getlist)
            response = StarletteResponse(body, status)
            response.raw_headers.extend((k.lower().encode(), v.encode()) for k, v in headers)
            return response

        app: Any = KoalaASGIMiddleware(Starlette(routes=[Route("/{path:path}", page)]), client=client, **options)
        self.app: Any = ProxyHeadersMiddleware(app, trusted_hosts="*") if proxy else app

    def get(
        self, path: str = "/", *, query: Headers = (), headers: Headers = (), https: bool = False, host: str = HOST
    ) -> Reply:
        base_url = ("https" if https else "http") + "://testserver"
        with TestClient(self.app, base_url=base_url) as test_client:  # a new client: an empty cookie jar
            response = test_client.get(path, params=list(query), headers=[("host", host), ("user-agent", UA), *headers])
        return Reply(response.status_code, list(response.headers.multi_items()), response.content)


STACKS: dict[str, type[FlaskStack | StarletteStack]] = {"flask": FlaskStack, "starlette": StarletteStack}


@pytest.fixture(params=sorted(STACKS))
def make_stack(request: pytest.FixtureRequest) -> Callable[..., Stack]:
    """``make_stack(koala_client, proxy=False, **middleware_options)`` on the stack under test.

    The server-kept copy is off unless a case turns it on: these cases are about ``ko_id``
    (``tests/test_identity.py`` has the copy's, with it on as by default).
    """

    def make(koala: KoalaClient, proxy: bool = False, **options: Any) -> Stack:
        return STACKS[request.param](koala, proxy, {"cookie_server_copy": False, **options})

    return make


def delivered(client: KoalaClient, collector: Collector) -> list[dict[str, Any]]:
    """Every visitor batch Koala received, once everything handed over has been sent."""
    assert client.flush(10)
    return collector.batches()


def events_by_path(batches: list[dict[str, Any]]) -> dict[str, str | None]:
    """``{tracked path: the batch's profile_id}``."""
    return {e["properties"]["path"]: b.get("profile_id") for b in batches for e in b["events"]}


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG):
        yield caplog


# -- opt-outs: Global Privacy Control and the consent callback -------------------------------


def test_gpc_turns_tracking_off_for_that_request_only(
    make_stack: Callable[..., Stack], client: KoalaClient, collector: Collector
) -> None:
    stack = make_stack(client)
    for headers in ([("Sec-GPC", "1")], [("Sec-GPC", "1"), ("Cookie", f"ko_id={VISITOR}")]):
        reply = stack.get("/opted-out", headers=headers)
        assert reply.status == 200 and reply.cookie is None
        # The handler still works: calls are validated (a bad one raises), then ignored.
        assert reply.json()["enabled"] is False and reply.json()["rejected"] == "ValueError"

    control = stack.get("/control", headers=[("Sec-GPC", "0")])  # only "1" opts out
    assert control.json() == {"profile_id": control.new_id, "enabled": True, "rejected": "ValueError"}
    assert events_by_path(delivered(client, collector)) == {"/control": control.new_id}


def test_respect_gpc_false_ignores_the_header(
    make_stack: Callable[..., Stack], client: KoalaClient, collector: Collector
) -> None:
    reply = make_stack(client, respect_gpc=False).get("/tracked", headers=[("Sec-GPC", "1")])
    assert reply.json()["enabled"] is True
    assert events_by_path(delivered(client, collector)) == {"/tracked": reply.new_id}


def test_should_track_false_means_no_cookie_and_tracker_calls_are_no_ops(
    make_stack: Callable[..., Stack], client: KoalaClient, collector: Collector
) -> None:
    """A consent banner's choice, read from the request: tracked only with consent."""

    def consented(info: RequestInfo) -> bool:
        return any("consent=yes" in header for header in info.cookie_headers)

    stack = make_stack(client, should_track=consented)
    for cookie in ("consent=no", f"consent=no; ko_id={VISITOR}"):
        reply = stack.get("/no-consent", headers=[("Cookie", cookie)])
        assert reply.cookie is None
        assert reply.json()["enabled"] is False and reply.json()["rejected"] == "ValueError"

    new = stack.get("/consent-new", headers=[("Cookie", "consent=yes")])
    returning = stack.get("/consent-returning", headers=[("Cookie", f"consent=yes; ko_id={VISITOR}")])
    assert returning.cookie is None and returning.json()["enabled"] is True
    assert events_by_path(delivered(client, collector)) == {"/consent-new": new.new_id, "/consent-returning": VISITOR}


def test_should_track_receives_a_request_info(make_stack: Callable[..., Stack], dry: KoalaClient) -> None:
    seen: list[RequestInfo] = []

    def decide(info: RequestInfo) -> bool:
        seen.append(info)
        return True

    make_stack(dry, should_track=decide).get(
        "/pricing",
        query=[("plan", "pro")],
        headers=[("Cookie", f"ko_id={VISITOR}")],
        https=True,
        host="app.example.com:8443",
    )
    (info,) = seen
    assert isinstance(info, RequestInfo)
    assert (info.method, info.scheme, info.https, info.host, info.path) == (
        "GET",
        "https",
        True,
        "app.example.com:8443",
        "/pricing",
    )
    # Starlette's test client puts "testclient" where the address goes: no IP, then.
    assert info.user_agent == UA and info.gpc is False and (info.ip is None or isinstance(info.ip, str))
    assert any(f"ko_id={VISITOR}" in header for header in info.cookie_headers)
    assert info.raw is not None  # the environ or the scope, for decisions that need more


# -- excluded paths ---------------------------------------------------------------------------


def test_excluded_paths_get_no_cookie_and_no_tracker_work(
    make_stack: Callable[..., Stack], client: KoalaClient, collector: Collector
) -> None:
    asked: list[str] = []

    def decide(info: RequestInfo) -> bool:
        asked.append(info.path)
        return True

    stack = make_stack(client, exclude_paths=["/healthz", "/static/"], should_track=decide)
    for path in ("/healthz", "/healthz/live", "/static", "/static/app.css", "/static/img/logo.png"):
        for headers in ([], [("Cookie", f"ko_id={VISITOR}")]):
            reply = stack.get(path, headers=headers)
            assert reply.status == 200 and reply.cookie is None, path
            assert reply.json()["enabled"] is False and reply.json()["profile_id"] is None, path
    assert asked == []  # not even the consent callback runs for an excluded path

    tracked = {path: stack.get(path).new_id for path in ("/staticfoo", "/healthzz", "/")}
    assert asked == ["/staticfoo", "/healthzz", "/"]
    assert events_by_path(delivered(client, collector)) == tracked


# -- responses a shared cache may store ----------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "cookie_set"),
    [
        pytest.param([("cc", "public, max-age=600")], False, id="public"),
        pytest.param([("cc", "max-age=60, S-MAXAGE=600")], False, id="s-maxage"),
        pytest.param([("cc", "public"), ("cc", "max-age=600")], False, id="public-in-one-of-two-headers"),
        pytest.param([("status", "304")], False, id="304"),
        pytest.param([("status", "304"), ("cc", "private")], False, id="304-private"),
        pytest.param([("cc", "private, public")], True, id="private-wins"),
        pytest.param([("cc", "public"), ("cc", "private")], True, id="private-in-another-header"),
        pytest.param([("cc", "public, no-store")], True, id="no-store-wins"),
        pytest.param([("cc", 'no-cache="public"')], True, id="public-only-quoted"),
        pytest.param([("cc", "max-age=600, private")], True, id="browser-cache-only"),
        pytest.param([("cc", "max-age=600")], False, id="max-age-a-shared-cache-may-use"),
        pytest.param([], True, id="no-cache-control"),
    ],
)
def test_no_cookie_on_responses_a_shared_cache_may_store_or_on_304(
    make_stack: Callable[..., Stack], dry: KoalaClient, query: list[tuple[str, str]], cookie_set: bool
) -> None:
    reply = make_stack(dry).get("/page", query=query)
    assert reply.status == int(dict(query).get("status", 200))
    assert (reply.cookie is not None) is cookie_set
    expected_cc = [v for k, v in query if k == "cc"]
    assert [v for k, v in reply.headers if k.lower() == "cache-control"] == expected_cc  # the app's, untouched


def test_skipping_the_cookie_for_a_shared_cache_is_logged_once_at_debug(
    make_stack: Callable[..., Stack],
    dry: KoalaClient,
    debug_log: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_cookie, "_logged_shared_cache_skip", False)  # once per process, so start afresh
    stack = make_stack(dry)
    for _ in range(3):
        assert stack.get("/page", query=[("cc", "public, max-age=60")]).cookie is None
    skips = [r for r in debug_log.records if r.msg == _cookie.SHARED_CACHE_SKIP_MESSAGE]
    assert [(r.name, r.levelno) for r in skips] == [("koala_middleware", logging.DEBUG)]


# -- the Host header is client controlled ---------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "domain"),
    [
        pytest.param("www.example.com", "example.com", id="allowed"),
        pytest.param("Example.COM.", "example.com", id="allowed-apex-any-case"),
        pytest.param("app.example.com:99999", "example.com", id="absurd-port"),
        pytest.param("evil.com", None, id="evil"),
        pytest.param("app.example.com.evil.com", None, id="allowed-as-a-prefix"),
        pytest.param("evilexample.com", None, id="allowed-as-a-suffix"),
        pytest.param("not a host!", None, id="garbage"),
        pytest.param("[::1", None, id="broken-ipv6"),
        pytest.param("app.example.com:https", None, id="port-not-a-number"),
        pytest.param("x" * 5000 + ".example.com", None, id="very-long"),
        pytest.param("", None, id="empty"),
    ],
)
def test_spoofed_host_headers_get_a_host_only_cookie_never_a_foreign_domain(
    make_stack: Callable[..., Stack], dry: KoalaClient, host: str, domain: str | None
) -> None:
    reply = make_stack(dry, allowed_hosts=["example.com"]).get("/page", host=host)
    assert reply.status in (200, 400)  # never a 500; werkzeug itself refuses some hosts (400)
    cookie = reply.cookie
    assert cookie is not None
    expected = f"; Domain={domain}" if domain else ""
    assert cookie == f"ko_id={reply.new_id}{expected}; Path=/; Max-Age=31536000; SameSite=Lax"
    handler_ran = reply.status == 200
    sent = [json.loads(batch.body)["profile_id"] for batch in dry.dry_run_batches]
    assert sent == ([reply.new_id] if handler_ran else [])


def test_a_fixed_cookie_domain_is_used_only_for_hosts_under_it(
    make_stack: Callable[..., Stack], dry: KoalaClient
) -> None:
    stack = make_stack(dry, cookie_domain="example.com")
    assert "; Domain=example.com;" in (stack.get(host="shop.eu.example.com").cookie or "")
    assert "; Domain=example.com;" in (stack.get(host="example.com").cookie or "")
    assert "Domain" not in (stack.get(host="evil.com").cookie or "Domain")


# -- the incoming id -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cookie_headers", "visitor"),
    [
        pytest.param([f"ko_id={VISITOR}"], VISITOR, id="plain"),
        pytest.param([f'theme=dark; ko_id="{VISITOR}"; session=abc'], VISITOR, id="quoted-among-others"),
        pytest.param([f"ko_id=forged; ko_id={VISITOR}"], VISITOR, id="after-a-forged-duplicate"),
        pytest.param([f"ko_id={VISITOR}; ko_id={OTHER_VISITOR}"], VISITOR, id="first-valid-wins"),
        pytest.param(["ko_id=forged", f"ko_id={VISITOR}"], VISITOR, id="second-cookie-header"),
    ],
)
def test_a_returning_visitor_keeps_their_id_and_gets_no_set_cookie(
    make_stack: Callable[..., Stack], client: KoalaClient, collector: Collector, cookie_headers: list[str], visitor: str
) -> None:
    stack = make_stack(client)
    if len(cookie_headers) > 1 and isinstance(stack, FlaskStack):
        # A WSGI server joins repeated headers with ", " (werkzeug, gunicorn), and a "," belongs
        # to a cookie's value (RFC 6265bis): browsers send one Cookie header over HTTP/1.1.
        cookie_headers = ["; ".join(cookie_headers)]
    reply = stack.get("/back", headers=[("Cookie", c) for c in cookie_headers])
    assert reply.cookie is None and reply.json()["profile_id"] == visitor
    assert [b["profile_id"] for b in delivered(client, collector)] == [visitor]


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param("forged.visitor.id", id="not-url-safe"),
        pytest.param("short-id-15char", id="15-characters"),
        pytest.param("00000000-0000-0000-0000-000000000000", id="nil-uuid"),
        pytest.param("{" + VISITOR + "}", id="braces"),
        pytest.param(VISITOR + "0" * 4000, id="too-long"),
        pytest.param("<script>alert('ko')</script>", id="markup"),
        pytest.param("%0d%0aSet-Cookie:%20evil=1", id="header-injection"),
    ],
)
def test_a_forged_id_is_replaced_and_never_echoed(
    make_stack: Callable[..., Stack],
    client: KoalaClient,
    collector: Collector,
    debug_log: pytest.LogCaptureFixture,
    forged: str,
) -> None:
    stack = make_stack(client)
    replies = [
        stack.get("/forged", headers=[("Cookie", f"ko_id={forged}")]),
        stack.get("/forged-twice", headers=[("Cookie", f"ko_id={forged}; ko_id={forged}.")]),
        stack.get("/lookalike-names", headers=[("Cookie", f"xko_id={VISITOR}; ko_id_={VISITOR}; ko_id={forged}")]),
    ]
    batches = delivered(client, collector)
    for reply in replies:
        assert reply.status == 200 and reply.json()["profile_id"] == reply.new_id != VISITOR
    assert sorted(b["profile_id"] for b in batches) == sorted(r.new_id for r in replies)

    visible = [
        *(f"{k}: {v}" for r in replies for k, v in r.headers),
        *(r.body.decode() for r in replies),
        *(r.body.decode() for r in collector.requests("/batch")),
        *(json.dumps(r.headers) for r in collector.requests("/batch")),
        debug_log.text,
    ]
    for text in visible:
        assert forged not in text and forged.lower() not in text and VISITOR not in text


# -- options and the Secure flag ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "https", "attributes"),
    [
        pytest.param({}, False, DEFAULT_COOKIE, id="defaults"),
        pytest.param({}, True, DEFAULT_COOKIE + "; Secure", id="https-is-secure"),
        pytest.param({"cookie_secure": True}, False, DEFAULT_COOKIE + "; Secure", id="secure-forced"),
        pytest.param({"cookie_secure": False}, True, DEFAULT_COOKIE, id="secure-off"),
        pytest.param({"cookie_max_age": 3600}, False, DEFAULT_COOKIE.replace("31536000", "3600"), id="max-age"),
        pytest.param(
            {"cookie_max_age": 10 * 365 * 86400},
            False,
            DEFAULT_COOKIE.replace("31536000", "34560000"),
            id="max-age-capped-at-400-days",
        ),
        pytest.param({"cookie_samesite": "strict"}, False, DEFAULT_COOKIE.replace("Lax", "Strict"), id="strict"),
        pytest.param(
            {"cookie_samesite": "none"},
            False,
            DEFAULT_COOKIE.replace("Lax", "None") + "; Secure",
            id="samesite-none-needs-secure",
        ),
        pytest.param(
            {"cookie_domain": "www.example.com"},
            False,
            DEFAULT_COOKIE.replace("=example", "=www.example"),
            id="fixed-domain",
        ),
    ],
)
def test_cookie_options(
    make_stack: Callable[..., Stack], dry: KoalaClient, options: dict[str, Any], https: bool, attributes: str
) -> None:
    reply = make_stack(dry, **options).get(https=https)
    assert reply.cookie == f"ko_id={reply.new_id}{attributes}"


def test_cookie_name_is_the_one_read_and_set(make_stack: Callable[..., Stack], dry: KoalaClient) -> None:
    stack = make_stack(dry, cookie_name="visitor")
    assert stack.get(headers=[("Cookie", f"visitor={VISITOR}")]).set_cookies == []
    reply = stack.get(headers=[("Cookie", f"ko_id={VISITOR}")])
    (cookie,) = reply.set_cookies
    assert cookie.startswith("visitor=") and VISITOR not in cookie and reply.json()["profile_id"] != VISITOR


@pytest.mark.parametrize("proxy", [True, False], ids=["trusted-proxy", "no-proxy-handling"])
def test_secure_follows_the_scheme_a_trusted_proxy_reports(
    make_stack: Callable[..., Stack], client: KoalaClient, collector: Collector, proxy: bool
) -> None:
    """Behind ProxyFix (WSGI) or uvicorn's proxy headers (ASGI) the forwarded scheme and
    address count; without them, raw X-Forwarded-* headers are ignored (clients forge them)."""
    forwarded = [("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "198.51.100.9")]
    reply = make_stack(client, proxy=proxy).get(headers=forwarded)
    assert (reply.cookie or "").endswith("; Secure") is proxy
    (batch,) = delivered(client, collector)
    assert (batch.get("ip") == "198.51.100.9") is proxy


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"exclude_paths": "/healthz"}, TypeError),
        ({"exclude_paths": ["healthz"]}, ValueError),
        ({"should_track": True}, TypeError),
        ({"allowed_hosts": "example.com"}, TypeError),
        ({"cookie_domain": "https://example.com"}, ValueError),
        ({"cookie_name": "ko id"}, ValueError),
        ({"cookie_max_age": 0}, ValueError),
        ({"cookie_samesite": "none", "cookie_secure": False}, ValueError),
        ({"cookie_samesite": "relaxed"}, ValueError),
        ({"respect_gcp": False}, TypeError),  # a typo is an error, not a silent default
    ],
)
def test_bad_privacy_options_fail_when_the_middleware_is_made(
    make_stack: Callable[..., Stack], dry: KoalaClient, options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        make_stack(dry, **options)
