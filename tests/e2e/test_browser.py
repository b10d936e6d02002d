"""The ``ko_id`` cookie in a real browser: Debian's headless Chromium against uvicorn.

Koala's pixel runs on every subdomain of a site and reads ``ko_id`` from JavaScript, so the
id the server sets on one subdomain must reach the others and ``document.cookie``. Chromium
resolves ``app.example.test``, ``www.example.test`` and ``other.test`` to 127.0.0.1 (its
``--host-resolver-rules``; nothing leaves loopback) and keeps its cookies as it would for a
visitor. ``scripts/dev.py`` installs the ``chromium`` package; without it the test skips.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.chromium import chromium_context
from e2e.servers import Server, free_port, serve
from koala_middleware.testing import Collector

APP = "tests.e2e.apps.browser_app:app"
HOSTS = ("app.example.test", "www.example.test", "other.test")
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.fixture
def browser_context() -> Iterator[Any]:
    """A fresh Chromium profile (no cookies yet), or a skip saying why there is none."""
    with chromium_context(",".join(f"MAP {host} 127.0.0.1" for host in HOSTS)) as context:
        yield context


@pytest.fixture
def server(collector: Collector) -> Iterator[Server]:
    port = free_port()
    args = ["uvicorn", APP, "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    with serve(args, port, env={"KOALA_API_URL": collector.url, "KOALA_PUBLIC_KEY": "pk_test"}) as running:
        yield running


def visit(context: Any, url: str) -> tuple[dict[str, str], str, str, str | None]:
    """Open ``url`` in a new tab: what the server saw, ``document.cookie``, the browser's
    User-Agent and the response's Set-Cookie."""
    page = context.new_page()
    response = page.goto(url)
    assert response is not None and response.status == 200, url
    seen = {
        "cookie": page.locator("#cookie-header").inner_text(),
        "profile_id": page.locator("#profile-id").inner_text(),
    }
    document_cookie = page.evaluate("document.cookie")  # what Koala's pixel reads
    user_agent = page.evaluate("navigator.userAgent")
    set_cookie = response.header_value("set-cookie")
    page.close()
    return seen, document_cookie, user_agent, set_cookie


def test_the_id_set_on_one_subdomain_is_sent_on_another_and_readable_by_javascript(
    browser_context: Any, server: Server, collector: Collector
) -> None:
    port = server.port

    first, first_js, user_agent, set_cookie = visit(browser_context, f"http://app.example.test:{port}/")
    visitor_id = first["profile_id"]
    assert UUID4.fullmatch(visitor_id)
    assert first["cookie"] == ""  # a fresh profile: the id was made by the server
    attributes = "; Domain=example.test; Path=/; Max-Age=31536000; SameSite=Lax"
    assert set_cookie == f"ko_id={visitor_id}{attributes}\nko_id_server={visitor_id}{attributes}; HttpOnly"
    assert f"ko_id={visitor_id}" in first_js.split("; ")
    assert "ko_id_server" not in first_js  # HttpOnly: the server-kept copy is not for scripts

    (kept,) = [c for c in browser_context.cookies() if c["name"] == "ko_id"]
    assert kept["value"] == visitor_id
    assert kept["domain"] == ".example.test" and kept["path"] == "/"
    assert kept["httpOnly"] is False and kept["sameSite"] == "Lax" and kept["secure"] is False

    second, second_js, _, second_set_cookie = visit(browser_context, f"http://www.example.test:{port}/")
    assert f"ko_id={visitor_id}" in second["cookie"].split("; ")  # the browser sent it across
    assert second["profile_id"] == visitor_id
    assert second_set_cookie is None  # a returning visitor is not given a new id
    assert f"ko_id={visitor_id}" in second_js.split("; ")

    # Another site (not under example.test) is another visitor; allowed_hosts keeps its cookie host-only.
    other, other_js, _, other_set_cookie = visit(browser_context, f"http://other.test:{port}/")
    assert "ko_id" not in other["cookie"]
    assert UUID4.fullmatch(other["profile_id"]) and other["profile_id"] != visitor_id
    assert other_set_cookie == (
        f"ko_id={other['profile_id']}; Path=/; Max-Age=31536000; SameSite=Lax\n"
        f"ko_id_server={other['profile_id']}; Path=/; Max-Age=31536000; SameSite=Lax; HttpOnly"
    )
    assert other_js == f"ko_id={other['profile_id']}"

    # reset() at logout: the browser holds the new id on every subdomain.
    logged_out, logged_out_js, _, logout_set_cookie = visit(browser_context, f"http://app.example.test:{port}/logout")
    new_id = logged_out["profile_id"]
    assert UUID4.fullmatch(new_id) and new_id != visitor_id
    assert logout_set_cookie == f"ko_id={new_id}{attributes}\nko_id_server={new_id}{attributes}; HttpOnly"
    assert f"ko_id={new_id}" in logged_out_js.split("; ")
    after, after_js, _, after_set_cookie = visit(browser_context, f"http://www.example.test:{port}/")
    assert after["profile_id"] == new_id and after_set_cookie is None and f"ko_id={new_id}" in after_js.split("; ")

    # The page's script deletes ko_id, as Safari's 7-day cap on script-written cookies would:
    # the next navigation restores the same id from the server-kept copy.
    page = browser_context.new_page()
    page.goto(f"http://www.example.test:{port}/")
    page.evaluate("document.cookie = 'ko_id=; Max-Age=0; Domain=example.test; Path=/'")
    assert "ko_id=" not in page.evaluate("document.cookie")
    page.close()
    restored, restored_js, _, restored_set_cookie = visit(browser_context, f"http://app.example.test:{port}/")
    assert "ko_id=" not in restored["cookie"].replace("ko_id_server=", "")  # only the copy was sent
    assert restored["profile_id"] == new_id  # the same visitor, not a new one
    assert restored_set_cookie == f"ko_id={new_id}{attributes}"
    assert f"ko_id={new_id}" in restored_js.split("; ")

    # Koala receives the visits of the two subdomains as one visitor, with the browser's UA.
    assert collector.wait_for(7, timeout=15), collector.received
    batches = {
        (b["events"][0]["properties"]["host"], b["events"][0]["event"], b["profile_id"]) for b in collector.batches()
    }
    assert batches == {
        ("app.example.test", "Viewed Page", visitor_id),
        ("www.example.test", "Viewed Page", visitor_id),
        ("other.test", "Viewed Page", other["profile_id"]),
        ("app.example.test", "Logged Out", visitor_id),  # before reset(): the old id
        ("www.example.test", "Viewed Page", new_id),
        ("app.example.test", "Viewed Page", new_id),
    }
    assert {r.headers["user-agent"] for r in collector.requests("/batch")} == {user_agent}
