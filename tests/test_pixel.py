"""The first-party pixel (``pixel_path``) through real servers on loopback: Flask under
werkzeug's threaded server behind ``ProxyFix``, FastAPI under uvicorn ``--proxy-headers``,
each in front of stand-ins for Koala's API and CDN (tests/pixel_upstreams.py)."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from flask import Flask
from pixel_upstreams import EchoWebSocket, Upstream, upstreams
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import make_server

from koala_middleware import KoalaASGIMiddleware, KoalaClient, KoalaWSGIMiddleware
from koala_middleware.flask import Koala

PIXEL = {"pixel_path": "/_k", "pixel_timeout": 1.5, "pixel_connect_timeout": 0.5}
UA = "Mozilla/5.0 (X11; Linux x86_64) pixel-test"


@pytest.fixture(scope="module")
def stand_ins() -> Iterator[tuple[Upstream, Upstream]]:
    with upstreams() as pair:
        yield pair


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def serve_wsgi(app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()


def serve_asgi(app: Any) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
        lifespan="off",
        ws="websockets-sansio",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


def flask_app(api: str, cdn: str, **options: Any) -> Flask:
    app = Flask("pixel")

    @app.route("/", methods=["GET", "POST"])
    def home() -> str:
        return "the app"

    @app.route("/<path:anything>", methods=["GET", "POST"])
    def anything(anything: str) -> tuple[str, int]:
        return f"the app: {anything}", 404

    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1)  # type: ignore[method-assign]
    Koala(app, client=KoalaClient(dry_run=True), pixel_api_url=api, pixel_cdn_url=cdn, **{**PIXEL, **options})
    return app


def fastapi_app(api: str, cdn: str, **options: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/")
    async def home() -> str:
        return "the app"

    app.add_middleware(
        KoalaASGIMiddleware,  # type: ignore[arg-type]
        client=KoalaClient(dry_run=True),
        pixel_api_url=api,
        pixel_cdn_url=cdn,
        **{**PIXEL, **options},
    )
    return app


@pytest.fixture(scope="module", params=["flask", "fastapi"])
def front(request: pytest.FixtureRequest, stand_ins: tuple[Upstream, Upstream]) -> Iterator[str]:
    api, cdn = stand_ins
    if request.param == "flask":
        yield from serve_wsgi(flask_app(api.url, cdn.url))
    else:
        yield from serve_asgi(fastapi_app(api.url, cdn.url))


@pytest.fixture
def http(front: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=front, headers={"User-Agent": UA}, timeout=10) as client:
        yield client


def last(upstream: Upstream, marker: str) -> Any:
    found = [seen for seen in upstream.seen if marker in seen.path]
    assert found, f"the upstream never saw {marker}"
    return found[-1]


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "POST", "PATCH", "DELETE"])
def test_every_method_reaches_the_api_with_query_and_body(
    http: httpx.Client, stand_ins: tuple[Upstream, Upstream], method: str
) -> None:
    api, _ = stand_ins
    marker = uuid.uuid4().hex
    body = b'{"events": [1, 2]}' if method in ("PUT", "POST", "PATCH") else b""
    response = http.request(
        method,
        f"/_k/web/projects/pk_test/{marker}?a=1&b=%20x&c",
        content=body or None,
        headers={"Content-Type": "application/json"} if body else {},
    )
    assert response.status_code == 200
    seen = last(api, marker)
    assert seen.method == method
    assert seen.path == f"/web/projects/pk_test/{marker}?a=1&b=%20x&c"
    assert seen.body == body
    assert seen.headers["host"] == api.url.removeprefix("http://")  # the upstream's own Host
    assert seen.headers["user-agent"] == UA


def test_other_methods_are_refused(http: httpx.Client) -> None:
    assert http.request("TRACE", "/_k/web/x").status_code == 405


def test_requests_outside_the_path_reach_the_app(http: httpx.Client) -> None:
    assert http.get("/").text.strip('"') == "the app"
    assert http.get("/_kx/web").status_code == 404  # a sibling of the prefix is the app's
    assert "_k" not in http.get("/_k").text or http.get("/_k").status_code == 404


def test_cdn_paths_go_to_the_cdn_and_sdk_js_is_cached(http: httpx.Client, stand_ins: tuple[Upstream, Upstream]) -> None:
    _, cdn = stand_ins
    key = "pk_" + uuid.uuid4().hex[:12]
    first = http.get(f"/_k/v1/{key}/sdk.js")
    second = http.get(f"/_k/v1/{key}/sdk.js")
    assert first.status_code == second.status_code == 200
    assert first.headers["content-type"] == "application/javascript"
    assert first.content == second.content and b"stand-in sdk.js" in first.content
    assert len([seen for seen in cdn.seen if key in seen.path]) == 1  # the second from memory


def test_answers_stream_as_they_come(front: str) -> None:
    started = time.monotonic()
    with httpx.stream("GET", front + "/_k/stream", timeout=10) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        first_at = time.monotonic() - started
        rest = b"".join(chunks)
    assert (first + rest).decode().count("part") == 3
    assert first_at < 0.5, "the first chunk waited for the whole answer"
    assert time.monotonic() - started >= 0.6


def test_compressed_answers_pass_through_untouched(http: httpx.Client, stand_ins: tuple[Upstream, Upstream]) -> None:
    api, _ = stand_ins
    with http.stream("GET", "/_k/gzip", headers={"Accept-Encoding": "gzip"}) as response:
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw) == b'{"compressed": true}' * 50
    assert last(api, "/gzip").headers["accept-encoding"] == "gzip"


def test_no_accept_encoding_is_added(http: httpx.Client, stand_ins: tuple[Upstream, Upstream]) -> None:
    api, _ = stand_ins
    marker = uuid.uuid4().hex
    http.get(f"/_k/web/{marker}", headers={"Accept-Encoding": ""})
    seen = last(api, marker)
    assert not seen.headers.get("accept-encoding")


def test_only_koala_cookies_go_up_and_never_authorization(
    http: httpx.Client, stand_ins: tuple[Upstream, Upstream]
) -> None:
    api, _ = stand_ins
    marker = uuid.uuid4().hex
    http.post(
        f"/_k/web/{marker}",
        content=b"{}",
        headers={
            "Cookie": "session=secret; ko_id=0b5e8a4c-3f1d-4a2b-9c7e-1d2e3f4a5b6c; csrftoken=t; ko_sid=s1",
            "Authorization": "Bearer app-secret",
            "Referer": "https://app.example.test/account?token=x",
            "X-Api-Key": "app-key",
        },
    )
    seen = last(api, marker)
    assert seen.headers["cookie"] == "ko_id=0b5e8a4c-3f1d-4a2b-9c7e-1d2e3f4a5b6c; ko_sid=s1"
    for name in ("authorization", "referer", "x-api-key"):
        assert name not in seen.headers


def test_only_koala_cookies_come_back_within_the_site(http: httpx.Client) -> None:
    response = http.get("/_k/cookies", headers={"Host": "app.example.test"})
    cookies = response.headers.get_list("set-cookie")
    assert cookies == ["ko_sid=abc; Path=/; Max-Age=60", "ko_far=1; Path=/", "ko_near=1; Domain=example.test; Path=/"]


def test_the_visitor_ip_is_the_corrected_one_never_the_raw_header(
    http: httpx.Client, stand_ins: tuple[Upstream, Upstream]
) -> None:
    """ProxyFix(x_for=1) and uvicorn --proxy-headers trust one hop: the last address."""
    api, _ = stand_ins
    marker = uuid.uuid4().hex
    http.get(f"/_k/web/{marker}", headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.7"})
    seen = last(api, marker)
    assert seen.headers["x-forwarded-for"] == "203.0.113.7"
    assert seen.headers["cloudfront-viewer-address"] == "203.0.113.7:0"  # the port is the proxy's: unknown
    assert [v for k, v in seen.raw_headers if k == "x-forwarded-for"] == ["203.0.113.7"]


def test_without_proxy_handling_a_client_x_forwarded_for_is_ignored(stand_ins: tuple[Upstream, Upstream]) -> None:
    api, cdn = stand_ins

    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"app"]

    middleware = KoalaWSGIMiddleware(
        app, KoalaClient(dry_run=True), pixel_api_url=api.url, pixel_cdn_url=cdn.url, **PIXEL
    )
    for base in serve_wsgi(middleware):
        marker = uuid.uuid4().hex
        httpx.get(f"{base}/_k/web/{marker}", headers={"X-Forwarded-For": "6.6.6.6"})
        seen = last(api, marker)
        assert seen.headers["x-forwarded-for"] == "127.0.0.1"
        host, port = seen.headers["cloudfront-viewer-address"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0


def test_hop_by_hop_headers_are_dropped_both_ways(http: httpx.Client, stand_ins: tuple[Upstream, Upstream]) -> None:
    api, _ = stand_ins
    marker = uuid.uuid4().hex
    http.get(
        f"/_k/web/{marker}",
        headers={
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
        },
    )
    seen = last(api, marker)
    for name in ("x-hop", "te", "proxy-authorization"):
        assert name not in seen.headers
    answer = http.get("/_k/hop")
    assert answer.headers["x-kept"] == "yes"
    for name in ("x-custom-hop", "keep-alive", "strict-transport-security", "clear-site-data"):
        assert name not in answer.headers


def test_redirects_are_passed_back_not_followed(http: httpx.Client, stand_ins: tuple[Upstream, Upstream]) -> None:
    api, _ = stand_ins
    before = len([s for s in api.seen if "after-redirect" in s.path])
    relative = http.get("/_k/redirect")
    absolute = http.get("/_k/redirect-absolute")
    assert relative.status_code == 302 and relative.headers["location"] == "/_k/web/after-redirect"
    assert absolute.status_code == 301 and absolute.headers["location"] == "/_k/web/after-redirect"
    assert len([s for s in api.seen if "after-redirect" in s.path]) == before


def test_a_body_over_the_cap_is_refused(http: httpx.Client, stand_ins: tuple[Upstream, Upstream]) -> None:
    api, _ = stand_ins
    marker = uuid.uuid4().hex
    response = http.post(f"/_k/web/{marker}", content=b"x" * (1024 * 1024 + 1))
    assert response.status_code == 413
    assert not [s for s in api.seen if marker in s.path]


def test_a_slow_upstream_answers_504_within_the_deadline(http: httpx.Client) -> None:
    started = time.monotonic()
    response = http.get("/_k/slow")
    assert response.status_code == 504
    assert time.monotonic() - started < 3.0


def test_a_dripping_upstream_is_cut_at_the_deadline(front: str) -> None:
    started = time.monotonic()
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),  # closed mid-answer: the visitor learns it was cut
        httpx.stream("GET", front + "/_k/drip", timeout=10) as response,
    ):
        for chunk in response.iter_raw():
            received += chunk
    assert time.monotonic() - started < 3.5
    assert 0 < len(received) < 100


def test_a_huge_answer_streams_through(front: str) -> None:
    size = 0
    with httpx.stream("GET", front + "/_k/huge", timeout=30) as response:
        for chunk in response.iter_raw():
            size += len(chunk)
    assert size == 400 * 65536


def test_hostile_request_targets_never_leave_the_configured_upstream(
    front: str, stand_ins: tuple[Upstream, Upstream]
) -> None:
    api, cdn = stand_ins
    port = int(front.rsplit(":", 1)[1])

    def raw(target: str) -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                more = sock.recv(4096)
                if not more:
                    break
                data += more
        return int(data.split(b" ", 2)[1]) if data else 0

    assert raw("/_k//evil.test/x") == 400
    assert raw("//evil.test/_k/x") in (400, 404)  # the app's, or the server's refusal
    assert raw("/_k/web/%0d%0aX-Injected:%20yes") == 400
    assert raw("/_k/../web/x") in (400, 404)
    assert raw("/_k/%2e%2e/web/x") == 400
    assert raw("/_k/web\\..\\x") in (400, 404)
    marker = uuid.uuid4().hex
    # absolute form: proxied to the configured upstream (werkzeug), or left to the app (uvicorn)
    assert raw(f"http://evil.test/_k/web/{marker}") in (200, 400, 404)
    every = api.seen + cdn.seen
    assert not [s for s in every if "evil" in s.path or "x-injected" in s.headers or ".." in s.path]
    assert all(s.headers["host"] in (api.url[7:], cdn.url[7:]) for s in every)


def test_an_upstream_down_answers_502_quickly() -> None:
    dead = _dead_url()
    app = flask_app(dead, dead)
    for base in serve_wsgi(app):
        started = time.monotonic()
        assert httpx.get(base + "/_k/web/x").status_code == 502
        assert httpx.get(base + "/_k/v1/pk/sdk.js").status_code == 502
        assert time.monotonic() - started < 2
        assert httpx.get(base + "/").text == "the app"
    for base in serve_asgi(fastapi_app(dead, dead)):
        assert httpx.get(base + "/_k/web/x").status_code == 502
        assert httpx.get(base + "/").json() == "the app"


def test_failures_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    dead = _dead_url()
    app = flask_app(dead, dead)
    client = app.test_client()
    with caplog.at_level("WARNING", logger="koala_middleware"):
        for _ in range(3):
            assert client.get("/_k/web/x").status_code == 502
    middleware = app.extensions["koala"]
    assert middleware.pixel.stats.counts["upstream_unreachable"] == 3
    assert len([r for r in caplog.records if "could not be reached" in r.getMessage()]) == 1


def test_a_websocket_is_echoed_through_the_asgi_proxy() -> None:
    from websockets.sync.client import connect

    echo = EchoWebSocket()
    try:
        app = fastapi_app(echo.url, echo.url)
        for base in serve_asgi(app):
            with connect(
                base.replace("http", "ws") + "/_k/ws/live?x=1",
                additional_headers={"Cookie": "ko_id=abc; session=s", "Authorization": "Bearer x"},
                origin="http://app.example.test",  # type: ignore[arg-type]
                open_timeout=5,
            ) as ws:
                ws.send("hello")
                assert ws.recv(timeout=5) == "hello"
                ws.send(b"\x00\x01")
                assert ws.recv(timeout=5) == b"\x00\x01"
        seen = echo.handshakes[-1]
        assert seen["cookie"] == "ko_id=abc"
        assert "authorization" not in seen
        assert seen["origin"] == "http://app.example.test"
        assert seen["x-forwarded-for"] == "127.0.0.1"
    finally:
        echo.close()


def test_a_websocket_upgrade_under_wsgi_gets_501(stand_ins: tuple[Upstream, Upstream]) -> None:
    api, cdn = stand_ins
    for base in serve_wsgi(flask_app(api.url, cdn.url)):
        response = httpx.get(
            base + "/_k/ws",
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
        assert response.status_code == 501
        assert "ASGI" in response.text


def test_a_websocket_to_an_upstream_down_is_refused() -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    dead = _dead_url()
    for base in serve_asgi(fastapi_app(dead, dead)):
        with pytest.raises(InvalidStatus):
            connect(base.replace("http", "ws") + "/_k/ws", open_timeout=5)
        assert httpx.get(base + "/").json() == "the app"  # the server goes on


@pytest.mark.anyio
async def test_a_mounted_asgi_app_proxies_below_its_root_path(stand_ins: tuple[Upstream, Upstream]) -> None:
    api, cdn = stand_ins
    app = fastapi_app(api.url, cdn.url)
    marker = uuid.uuid4().hex
    transport = httpx.ASGITransport(app=app, root_path="/shop")
    async with httpx.AsyncClient(transport=transport, base_url="http://app.example.test") as http:
        response = await http.get(f"/shop/_k/web/{marker}")
    assert response.status_code == 200
    assert last(api, marker).path == f"/web/{marker}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_flask_reads_pixel_options_from_app_config(stand_ins: tuple[Upstream, Upstream]) -> None:
    api, cdn = stand_ins
    app = Flask("configured")
    app.config.update(KOALA_PIXEL_PATH="/_edge", KOALA_PIXEL_API_URL=api.url, KOALA_PIXEL_CDN_URL=cdn.url)
    Koala(app, client=KoalaClient(dry_run=True))
    marker = uuid.uuid4().hex
    assert app.test_client().get(f"/_edge/web/{marker}").status_code == 200
    assert last(api, marker).path == f"/web/{marker}"


def test_check_pixel_url_finds_both_documented_urls(front: str, capsys: pytest.CaptureFixture[str]) -> None:
    from koala_middleware.__main__ import main

    assert main(["check", "--pixel-url", front + "/_k", "--key", "pk_test"]) == 0
    said = capsys.readouterr().out
    assert "CDN (sdk.js): GET " + front + "/_k/v1/koala/sdk.js -> 200 application/javascript" in said
    assert "API: GET " + front + "/_k/web/projects/pk_test -> 200 application/json" in said
    assert "served first-party." in said

    assert main(["check", "--pixel-url", front + "/elsewhere", "--key", "pk_test"]) == 2
    said = capsys.readouterr().out
    assert "404" in said and "pixel_path" in said and "NOT served" in said
    assert main(["check", "--pixel-url", "app.example.com/_k"]) == 1


def test_non_ascii_header_values_pass_through_byte_for_byte(front: str, stand_ins: tuple[Upstream, Upstream]) -> None:
    """Servers hand header bytes over as latin-1 text; they go up as the same bytes."""
    api, _ = stand_ins
    port = int(front.rsplit(":", 1)[1])
    marker = uuid.uuid4().hex
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"GET /_k/web/{marker} HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n".encode()
            + b"User-Agent: Mozilla/5.0 caf\xc3\xa9\r\nAccept-Language: fr\r\n\r\n"
        )
        answer = b""
        while more := sock.recv(65536):
            answer += more
    assert answer.startswith(b"HTTP/1.1 200")
    seen = last(api, marker)
    assert seen.headers["user-agent"].encode("latin-1") == b"Mozilla/5.0 caf\xc3\xa9"


def test_the_app_behind_never_sees_a_proxy_failure(stand_ins: tuple[Upstream, Upstream]) -> None:
    """Whatever goes wrong inside the proxy is an answer (502), never an exception."""
    api, cdn = stand_ins
    app = flask_app(api.url, cdn.url)
    middleware = app.extensions["koala"]

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug in the proxy")

    middleware.pixel.upstream.client = broken
    assert app.test_client().get("/_k/web/x").status_code == 502
