"""The pixel proxy's pure parts: options checked at the call site, routing and header rules,
the script cache's freshness rules, and the snippet (plain, Flask's Jinja global)."""

from __future__ import annotations

import pytest
from flask import Flask, render_template_string

from koala_middleware import KoalaASGIMiddleware, KoalaClient, KoalaWSGIMiddleware
from koala_middleware._pixel import PixelSettings, pixel_snippet
from koala_middleware._pixel._cache import ScriptCache
from koala_middleware._pixel._route import Rejected, answer_headers, route
from koala_middleware.flask import Koala

SETTINGS = PixelSettings("/_k", "https://api.test", "https://cdn.test")


def noop_app(environ: object, start_response: object) -> list[bytes]:
    return []


@pytest.mark.parametrize(
    ("options", "keyword"),
    [
        ({"pixel_path": "_k"}, "pixel_path"),
        ({"pixel_path": "/"}, "pixel_path"),
        ({"pixel_path": "/a b"}, "pixel_path"),
        ({"pixel_path": "/_k", "pixel_api_url": "ftp://x"}, "pixel_api_url"),
        ({"pixel_path": "/_k", "pixel_cdn_url": "https://cdn.test/?x"}, "pixel_cdn_url"),
        ({"pixel_path": "/_k", "pixel_max_body": -1}, "pixel_max_body"),
        ({"pixel_path": "/_k", "pixel_timeout": 0}, "pixel_timeout"),
        ({"pixel_path": "/_k", "pixel_connect_timeout": "3"}, "pixel_connect_timeout"),
        ({"pixel_path": "/_k", "pixel_cache_seconds": -5}, "pixel_cache_seconds"),
    ],
)
def test_bad_options_name_their_keyword(options: dict[str, object], keyword: str) -> None:
    with pytest.raises(ValueError, match=keyword):
        KoalaWSGIMiddleware(noop_app, KoalaClient(dry_run=True), **options)  # type: ignore[arg-type]


def test_off_by_default_and_no_proxy_object() -> None:
    assert KoalaWSGIMiddleware(noop_app, KoalaClient(dry_run=True)).pixel is None
    assert KoalaASGIMiddleware(noop_app, KoalaClient(dry_run=True)).pixel is None  # type: ignore[arg-type]
    assert PixelSettings("/_k/").path == "/_k"


def test_routing_splits_cdn_and_api_and_quotes_the_path() -> None:
    cdn = route(SETTINGS, "GET", "/v1/pk/sdk.js", "", [], None, None)
    api = route(SETTINGS, "POST", "/web/projects/pk/batch", "a=1", [], "203.0.113.7", 5000)
    assert cdn.url == "https://cdn.test/v1/pk/sdk.js" and cdn.cdn
    assert api.url == "https://api.test/web/projects/pk/batch?a=1" and not api.cdn
    assert ("x-forwarded-for", "203.0.113.7") in api.headers
    assert ("cloudfront-viewer-address", "203.0.113.7:5000") in api.headers
    assert route(SETTINGS, "GET", "/web/é %", "", [], None, None).url == "https://api.test/web/%C3%A9%20%25"
    assert route(SETTINGS, "GET", "/v1/x", "", [], None, None, websocket=True).url.startswith("https://api.test")


@pytest.mark.parametrize("address", ["testclient", "/run/app.sock", "203.0.113.7, 10.0.0.1", "203.0.113.7\r\nx: y"])
def test_an_address_that_is_not_an_ip_is_not_forwarded(address: str) -> None:
    """The rule the batches follow (``ip`` only when it parses): a test client's or a unix
    socket's "address" never reaches Koala as the visitor's IP."""
    headers = route(SETTINGS, "GET", "/web/projects/pk", "", [], address, 5000).headers
    assert not [name for name, _ in headers if name in ("x-forwarded-for", "cloudfront-viewer-address")]


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("//evil.test/x", ""),
        ("/a/../b", ""),
        ("/./b", ""),
        ("/a\r\nX-Injected: 1", ""),
        ("/a\\b", ""),
        ("/a", "x=\r\n"),
        ("/a", "x= y"),
        ("/a", "é"),
        ("no-slash", ""),
    ],
)
def test_hostile_targets_are_refused(path: str, query: str) -> None:
    with pytest.raises(Rejected) as caught:
        route(SETTINGS, "GET", path, query, [], None, None)
    assert caught.value.status == 400


def test_header_values_with_line_breaks_are_dropped() -> None:
    out = route(SETTINGS, "GET", "/a", "", [("user-agent", "x\r\nInjected: 1"), ("origin", "https://o")], None, None)
    assert out.headers == [("origin", "https://o")]


def test_answer_headers_keep_site_cookies_and_drop_connection_named_ones() -> None:
    kept = answer_headers(
        [
            ("Connection", "close, X-Named"),
            ("X-Named", "1"),
            ("Set-Cookie", "ko_id=1; Domain=.Example.com; Path=/"),
            ("Set-Cookie", "ko_x=1; Domain=com"),
            ("Set-Cookie", "ko_y=1; Domain=notexample.com"),
            ("set-cookie", "csrftoken=1"),
            ("Location", "https://api.test/web/x"),
            ("Location", "//evil.test/"),
            ("Content-Encoding", "gzip"),
        ],
        "app.example.com:8443",
        "/_k",
        "https://api.test",
    )
    assert kept == [
        ("Set-Cookie", "ko_id=1; Domain=.Example.com; Path=/"),
        ("Set-Cookie", "ko_x=1"),
        ("Set-Cookie", "ko_y=1"),
        ("Location", "/_k/web/x"),
        ("Location", "//evil.test/"),
        ("Content-Encoding", "gzip"),
    ]


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ([("Cache-Control", "public, max-age=60")], 60.0),
        ([("Cache-Control", "max-age=86400")], 300.0),  # capped
        ([("Cache-Control", "private, max-age=60")], 0.0),
        ([("Cache-Control", "no-store")], 0.0),
        ([("Cache-Control", "max-age=60"), ("Set-Cookie", "ko_id=1")], 0.0),
        ([("Cache-Control", "max-age=60"), ("Vary", "Accept-Encoding")], 60.0),
        ([("Cache-Control", "max-age=60"), ("Vary", "Cookie")], 0.0),
        ([], 0.0),
    ],
)
def test_script_cache_freshness(headers: list[tuple[str, str]], seconds: float) -> None:
    assert ScriptCache(300).seconds_for(200, headers) == seconds
    assert ScriptCache(0).seconds_for(200, headers) == 0.0
    assert ScriptCache(300).seconds_for(404, headers) == 0.0


def test_snippet_points_at_the_first_party_path() -> None:
    html = pixel_snippet("pk_live_123", "/_k")
    assert html.startswith("<script>") and html.endswith("</script>")
    assert 'host:location.origin+"/_k"' in html
    assert 'location.origin+"/_k"+"/v1/pk_live_123/sdk.js"' in html
    assert "getkoala.com" not in html
    assert '"identify", "track"' in html


def test_snippet_with_nonce_and_host_is_escaped() -> None:
    html = pixel_snippet("pk", "/_k", nonce='a"b<', host="https://app.example.com/")
    assert '<script nonce="a&quot;b&lt;">' in html
    assert 'n.nonce="a\\"b\\u003c"' in html
    assert 'host:"https://app.example.com/_k"' in html


@pytest.mark.parametrize(
    ("args", "kwargs", "keyword"),
    [
        (("pk</script>", "/_k"), {}, "public_key"),
        (("pk", "_k"), {}, "pixel_path"),
        (("pk", "/_k"), {"host": "javascript:alert(1)"}, "host"),
    ],
)
def test_snippet_bad_input_names_the_keyword(args: tuple[str, str], kwargs: dict[str, str], keyword: str) -> None:
    with pytest.raises(ValueError, match=keyword):
        pixel_snippet(*args, **kwargs)


def test_flask_jinja_global() -> None:
    app = Flask("snippet")
    Koala(app, client=KoalaClient("pk_test", dry_run=True), pixel_path="/_k")

    @app.get("/")
    def home() -> str:
        return render_template_string("{{ koala_pixel(nonce='n1') }}")

    html = app.test_client().get("/").text
    assert '<script nonce="n1">' in html and "/v1/pk_test/sdk.js" in html

    bare = Flask("bare")
    Koala(bare, client=KoalaClient(dry_run=True))
    with bare.app_context(), pytest.raises(RuntimeError, match="pixel_path"):
        render_template_string("{{ koala_pixel() }}")
    dry = Flask("dry")
    Koala(dry, client=KoalaClient(dry_run=True), pixel_path="/_k")
    with dry.app_context():
        assert "no public key" in render_template_string("{{ koala_pixel() }}")


@pytest.mark.parametrize("length", ["-5", "1_0", "x", "+3", "\u00b2"])
def test_a_bad_content_length_is_refused(length: str) -> None:
    import io

    from koala_middleware._pixel._wsgi import read_body

    with pytest.raises(Rejected) as caught:
        read_body({"CONTENT_LENGTH": length, "wsgi.input": io.BytesIO(b"abc")}, 10)
    assert caught.value.status == 400


def test_a_body_that_cannot_be_read_is_refused() -> None:
    from koala_middleware._pixel._wsgi import read_body

    class Broken:
        def read(self, size: int) -> bytes:
            raise OSError("client went away")

    with pytest.raises(Rejected) as caught:
        read_body({"CONTENT_LENGTH": "3", "wsgi.input": Broken()}, 10)
    assert caught.value.status == 400


def test_an_odd_environ_or_scope_gets_a_502_not_an_exception(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    client = KoalaClient(dry_run=True)
    wsgi = KoalaWSGIMiddleware(noop_app, client, pixel_path="/_k")
    statuses: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/_k/web/x", "QUERY_STRING": b"bytes?"}
    body = wsgi(environ, lambda status, headers, exc_info=None: statuses.append(status))  # type: ignore[arg-type,misc]
    assert statuses == ["502 Bad Gateway"] and b"".join(body).startswith(b"Bad gateway")
    assert "unexpected error" in caplog.text

    asgi = KoalaASGIMiddleware(noop_app, client, pixel_path="/_k")  # type: ignore[arg-type]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/_k/web/x", "headers": [("host", "odd.test")]}  # str, not bytes
    asyncio.run(asgi(scope, receive, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 502


def test_the_proxy_uses_the_koala_clients_egress_proxy() -> None:
    from koala_middleware._pixel import egress_proxy

    assert egress_proxy(KoalaClient(dry_run=True, proxy="http://proxy.test:3128")) == "http://proxy.test:3128"
    assert egress_proxy(KoalaClient(dry_run=True)) is None  # then the environment's, as httpx reads it


def test_without_the_pixel_extra_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "httpx" else real(name, *a))
    with pytest.raises(ImportError, match=r"koala-middleware\[pixel\]"):
        KoalaWSGIMiddleware(noop_app, KoalaClient(dry_run=True), pixel_path="/_k")
    with pytest.raises(ImportError, match="httpx"):
        KoalaASGIMiddleware(noop_app, KoalaClient(dry_run=True), pixel_path="/_k")  # type: ignore[arg-type]
    KoalaWSGIMiddleware(noop_app, KoalaClient(dry_run=True))  # without pixel_path nothing is needed
