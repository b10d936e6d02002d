"""Koala's pixel served first-party, in a real browser: Debian's headless Chromium opens the
Flask example's page (served by gunicorn), with every request to ``*.getkoala.com`` blocked
as an ad blocker would; the page still loads the pixel through the app's ``/_k`` path.

The CDN and API are loopback stand-ins (tests/pixel_upstreams.py). The stand-in ``sdk.js``
does what the pixel does first: it reads ``window.koalaSettings.host`` and the ``ko_id``
cookie, posts to ``<host>/web/projects/<key>/batch``, and also tries Koala's own domain,
which must fail. Nothing leaves loopback (``--host-resolver-rules``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from pixel_upstreams import Upstream, upstreams

from e2e.servers import NO_CONTROL_SOCKET, Server, collector_env, free_port, serve
from koala_middleware.testing import Collector

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests may run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP app.example.test 127.0.0.1, MAP *.getkoala.com ~NOTFOUND",
]

PIXEL_JS = b"""(function () {
  var host = window.koalaSettings && window.koalaSettings.host;
  var found = document.cookie.match(/(?:^|; )ko_id=([^;]+)/);
  var id = found ? found[1] : null;
  var direct = fetch("https://api.getkoala.com/web/projects/pk_test/batch", {method: "POST", mode: "no-cors"})
    .then(function () { return "reached"; }, function () { return "blocked"; });
  var proxied = fetch(host + "/web/projects/pk_test/batch", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({profile_id: id, page_views: [{url: location.href}]})
  }).then(function (r) { return r.status; }, function (e) { return String(e); });
  Promise.all([direct, proxied]).then(function (v) {
    window.__pixel = {direct: v[0], proxied: v[1], id: id, host: host, queue: typeof window.ko};
  });
})();
"""


@pytest.fixture
def browser_context() -> Iterator[Any]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as exc:
        pytest.skip(f"playwright is not installed: {exc}")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package (scripts/dev.py does)")
    with tempfile.TemporaryDirectory(prefix="koala-pixel-chromium-") as profile, sync_playwright() as playwright:
        try:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=30_000
            )
        except Error as exc:
            pytest.skip(f"playwright could not launch {CHROMIUM}: {exc.message.splitlines()[0]}")
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def site(collector: Collector) -> Iterator[tuple[Server, Upstream, Upstream]]:
    with upstreams(PIXEL_JS) as (api, cdn):
        port = free_port()
        args = ["gunicorn", "-w", "1", "--threads", "4", "-b", f"127.0.0.1:{port}", *NO_CONTROL_SOCKET]
        args += ["--chdir", "examples/flask_app", "app:app"]
        env = {**collector_env(collector), "KOALA_PIXEL_API_URL": api.url, "KOALA_PIXEL_CDN_URL": cdn.url}
        with serve(args, port, env=env) as server:
            yield server, api, cdn


def test_the_example_page_loads_the_pixel_first_party_with_koala_blocked(
    browser_context: Any, site: tuple[Server, Upstream, Upstream]
) -> None:
    server, api, cdn = site
    blocked: list[str] = []

    def block(route: Any) -> None:
        blocked.append(route.request.url)
        route.abort("blockedbyclient")

    browser_context.route("**/*.getkoala.com/**", block)  # what an ad blocker's list does
    page = browser_context.new_page()
    origin = f"http://app.example.test:{server.port}"
    assert page.goto(origin + "/").status == 200
    page.wait_for_function("window.__pixel !== undefined")
    pixel = page.evaluate("window.__pixel")
    visitor_id = next(c["value"] for c in browser_context.cookies() if c["name"] == "ko_id")
    page.close()

    assert pixel["host"] == origin + "/_k"
    assert pixel["direct"] == "blocked" and blocked  # Koala's own domain never answered
    assert pixel["proxied"] == 200
    assert pixel["id"] == visitor_id and pixel["queue"] == "object"  # the snippet's command queue

    (script,) = [s for s in cdn.seen if s.path == "/v1/pk_test/sdk.js"]
    assert script.method == "GET"
    (batch,) = [s for s in api.seen if s.path == "/web/projects/pk_test/batch"]
    assert batch.method == "POST"
    assert f"ko_id={visitor_id}" in batch.headers["cookie"].split("; ")
    assert "session" not in batch.headers["cookie"]  # only Koala's cookies cross the proxy
    assert json.loads(batch.body)["profile_id"] == visitor_id
    assert batch.headers["x-forwarded-for"] == "127.0.0.1"
    assert batch.headers["origin"] == origin
