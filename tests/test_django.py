"""koala_middleware.django in a real Django project (tests/django_project), through Django's
own test clients, sync and async. Served runs (gunicorn, uvicorn) are in e2e/test_django_servers.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")
import django

django.setup()

from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.test import AsyncClient, Client, override_settings  # noqa: E402
from django_project import views  # noqa: E402

from helpers import FAST_RETRIES, run_tour  # noqa: E402
from koala_middleware import KoalaClient  # noqa: E402
from koala_middleware.django import KoalaMiddleware, _from_settings  # noqa: E402
from koala_middleware.testing import Collector  # noqa: E402

UA = "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0 django-test"
ID = "0b5e8a4c-3f1d-4a2b-9c7e-1d2e3f4a5b6c"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def koala_client(client: KoalaClient) -> Iterator[KoalaClient]:
    """The conftest client (sending to the collector), as ``settings.KOALA["client"]``."""
    with override_settings(KOALA={"client": client, "exclude_paths": ["/healthz"]}):
        yield client


def ko_id_header(response: Any) -> str | None:
    morsel = response.cookies.get("ko_id")
    return morsel.OutputString() if morsel is not None else None


def delivered(client: KoalaClient, collector: Collector) -> list[dict[str, Any]]:
    assert client.flush(5)
    return collector.batches()


def test_sync_view_identify_and_track_with_the_test_client(koala_client: KoalaClient, collector: Collector) -> None:
    browser = Client(HTTP_USER_AGENT=UA, REMOTE_ADDR="198.51.100.7")
    response = browser.get("/track", {"email": "ada@example.com", "n": 1}, HTTP_HOST="app.example.com")
    assert response.status_code == 200
    header = ko_id_header(response)
    assert header is not None and "Domain=example.com" in header and "Path=/" in header
    assert "HttpOnly" not in header and "SameSite=Lax" in header
    ko_id = response.json()["ko_id"]
    assert header.startswith(f"ko_id={ko_id};")
    [batch] = delivered(koala_client, collector)
    assert batch["profile_id"] == ko_id and batch["email"] == "ada@example.com" and batch["ip"] == "198.51.100.7"
    assert [e["event"] for e in batch["events"]] == ["Sync View"]
    assert batch["identifies"][0]["traits"] == {"plan": "pro", "email": "ada@example.com"}
    assert collector.requests("/batch")[0].headers["user-agent"] == UA

    again = browser.get("/track", {"n": 2}, HTTP_HOST="app.example.com")  # a returning visitor
    assert ko_id_header(again) is None and again.json()["ko_id"] == ko_id


def test_a_returning_visitor_keeps_the_id_and_gets_no_set_cookie(koala_client: KoalaClient) -> None:
    browser = Client(HTTP_COOKIE=f"ko_id={ID}; sessionid=x")
    response = browser.get("/who", HTTP_HOST="www.example.com")
    assert response.json()["ko_id"] == ID and ko_id_header(response) is None


def test_the_cookie_is_secure_when_django_says_the_request_is(koala_client: KoalaClient) -> None:
    browser = Client()
    secure = ko_id_header(browser.get("/who", secure=True, HTTP_HOST="app.example.com"))
    plain = ko_id_header(Client().get("/who", HTTP_HOST="app.example.com"))
    assert secure is not None and secure.endswith("; Secure") and "Domain=example.com" in secure
    assert plain is not None and "Secure" not in plain


def test_a_disallowed_host_gets_djangos_400_and_no_cookie(koala_client: KoalaClient) -> None:
    response = Client().get("/track", HTTP_HOST="evil.test")
    assert response.status_code == 400 and ko_id_header(response) is None


def test_excluded_paths_and_shared_cacheable_responses_get_no_cookie(koala_client: KoalaClient) -> None:
    browser = Client()
    health = browser.get("/healthz")
    assert health.content == b"ok enabled=False" and ko_id_header(health) is None
    assert ko_id_header(browser.get("/cached")) is None  # Cache-Control: public
    assert ko_id_header(browser.get("/who", HTTP_SEC_GPC="1")) is None  # Global Privacy Control


def test_should_track_sees_djangos_request(client: KoalaClient) -> None:
    from django.http import HttpRequest

    seen: list[tuple[str, str | None, bool]] = []

    def consent(info: Any) -> bool:
        assert isinstance(info.raw, HttpRequest)
        seen.append((info.path, info.host, info.https))
        return "consent=yes" in (info.raw.META.get("HTTP_COOKIE") or "")

    with override_settings(KOALA={"client": client, "should_track": consent}):
        declined = Client().get("/who", HTTP_HOST="app.example.com")
        accepted = Client(HTTP_COOKIE="consent=yes").get("/who", HTTP_HOST="app.example.com")
    assert declined.json()["ko_id"] is None and ko_id_header(declined) is None
    assert ko_id_header(accepted) is not None
    assert seen == [("/who", "app.example.com", False)] * 2


def test_the_ip_is_remote_addr_as_django_sees_it(koala_client: KoalaClient) -> None:
    response = Client(REMOTE_ADDR="203.0.113.9").get("/who", HTTP_X_FORWARDED_FOR="6.6.6.6")
    assert response.json()["ip"] == "203.0.113.9"


def test_streaming_response_streams_and_current_tracker_works_in_its_body(
    koala_client: KoalaClient, collector: Collector
) -> None:
    views.produced.clear()
    response = Client(HTTP_USER_AGENT=UA).get("/stream")
    assert response.streaming and views.produced == []  # nothing produced before it is read
    body = iter(response.streaming_content)
    assert next(body) == b"chunk 0\n" and views.produced == ["chunk 0"]
    assert b"".join(body) == b"chunk 1\nchunk 2\n"  # the end of the body closes the response
    [batch] = delivered(koala_client, collector)
    assert [e["properties"]["n"] for e in batch["events"]] == [0, 1, 2]


def test_a_file_response_keeps_its_file_for_sendfile(koala_client: KoalaClient, collector: Collector) -> None:
    from django.test import RequestFactory

    middleware = KoalaMiddleware(views.file)  # called as Django's handler would, without a test client
    response = middleware(RequestFactory().get("/file"))
    assert response.file_to_stream is not None  # what WSGIHandler hands to wsgi.file_wrapper
    response.close()  # what the server does once the file went out
    assert [e["event"] for b in delivered(koala_client, collector) for e in b["events"]] == ["Downloaded"]


def test_an_exception_in_a_view_still_delivers_what_was_recorded(
    koala_client: KoalaClient, collector: Collector
) -> None:
    with pytest.raises(views.Boom):
        Client().get("/boom")  # the test client re-raises the view's exception
    assert Client(raise_request_exception=False).get("/boom").status_code == 500
    events = [e["event"] for b in delivered(koala_client, collector) for e in b["events"]]
    assert events == ["Before Boom", "Before Boom"]


@pytest.mark.anyio
async def test_async_view_and_async_client(koala_client: KoalaClient, collector: Collector) -> None:
    browser = AsyncClient()  # Host: testserver, a single-label name
    response = await browser.get("/async-track", {"email": "grace@example.com", "n": 3}, headers={"User-Agent": UA})
    header = ko_id_header(response)
    assert response.status_code == 200 and header is not None and "Domain" not in header
    ko_id = response.json()["ko_id"]
    sync_view = await browser.get("/track", {"n": 4}, headers={"User-Agent": UA})  # a sync view under ASGI
    assert sync_view.json()["ko_id"] == ko_id and ko_id_header(sync_view) is None
    batches = delivered(koala_client, collector)
    assert {b["profile_id"] for b in batches} == {ko_id}
    assert sorted(e["event"] for b in batches for e in b["events"]) == ["Async View", "Sync View"]
    assert [b.get("email") for b in batches].count("grace@example.com") == 1
    assert {r.headers["user-agent"] for r in collector.requests("/batch")} == {UA}


@pytest.mark.anyio
async def test_async_streaming_response_with_async_client(koala_client: KoalaClient, collector: Collector) -> None:
    views.produced.clear()
    response = await AsyncClient().get("/async-stream")
    assert views.produced == []
    assert b"".join([chunk async for chunk in response.streaming_content]) == b"chunk 0\nchunk 1\nchunk 2\n"
    [batch] = delivered(koala_client, collector)
    assert [e["properties"]["n"] for e in batch["events"]] == [0, 1, 2]


def test_the_middleware_is_async_without_a_thread_hop_and_sync_under_wsgi() -> None:
    async def async_view(request: Any) -> None:
        return None

    assert asyncio.iscoroutinefunction(KoalaMiddleware(async_view))
    assert not asyncio.iscoroutinefunction(KoalaMiddleware(lambda request: None))
    assert KoalaMiddleware.sync_capable and KoalaMiddleware.async_capable


def test_settings_koala_as_an_options_dict(collector: Collector) -> None:
    options = {"public_key": "pk_test", "api_url": collector.url, "exclude_paths": ["/healthz"], **FAST_RETRIES}
    with override_settings(KOALA=options):
        browser = Client()
        assert browser.get("/track", {"n": 5}).status_code == 200
        assert ko_id_header(browser.get("/healthz")) is None
        made, _ = _from_settings()
        assert Client().get("/track").status_code == 200 and _from_settings()[0] is made  # one client
    try:
        assert made.api_url == collector.url and made.flush(5)
        assert [e["properties"]["n"] for e in collector.events()] == [5, 0]
    finally:
        made.shutdown(timeout=1)


def test_settings_koala_mistakes_are_reported_at_start_up() -> None:
    with override_settings(KOALA={"public_kee": "pk"}), pytest.raises(ImproperlyConfigured, match="public_kee"):
        Client().get("/who")
    with override_settings(KOALA=["pk_test"]), pytest.raises(ImproperlyConfigured, match="must be a dict"):
        Client().get("/who")
    with override_settings(KOALA={"client": "pk_test"}), pytest.raises(ImproperlyConfigured, match="KoalaClient"):
        Client().get("/who")


def test_an_outer_wsgi_middleware_tracker_is_handed_on(client: KoalaClient) -> None:
    from django.core.handlers.wsgi import WSGIHandler
    from werkzeug.test import Client as WerkzeugClient

    from koala_middleware import KoalaWSGIMiddleware

    with override_settings(KOALA={"client": client}):
        app = KoalaWSGIMiddleware(WSGIHandler(), client=client)
        response = WerkzeugClient(app).get("/who")
        cookies = response.headers.getlist("Set-Cookie")
        assert len([c for c in cookies if c.startswith("ko_id=")]) == 1
        assert cookies[0].startswith(f"ko_id={response.json['ko_id']};")


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "django_app" / "app.py"


def test_example_tour_prints_each_batch_koala_would_receive(tmp_path: Path) -> None:
    out = run_tour(EXAMPLE, tmp_path)
    assert "GET / -> 200; new visitor, Set-Cookie: ko_id=" in out
    assert "POST https://api2.getkoala.com/web/projects/<your public key>/batch" in out
    assert '"event": "Signed Up"' in out and '"domain": "acme-robotics.com"' in out
    assert '"event": "Upgraded Plan"' in out  # from the async view, through current_tracker()
    assert '"ip": "203.0.113.50"' in out and "User-Agent: Mozilla/5.0" in out
    assert "8 batches in all" in out


def test_without_django_the_import_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['django'] = None  # as if Django were not installed\n"
        "try:\n"
        "    import koala_middleware.django\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == "koala_middleware.django needs Django: pip install 'koala-middleware[django]'"


def test_the_server_kept_copy_and_reset_through_django(koala_client: KoalaClient, collector: Collector) -> None:
    new = Client().get("/who", HTTP_HOST="www.example.com")
    visitor = new.json()["ko_id"]
    copy = new.cookies["ko_id_server"]
    assert copy.value == visitor and copy["httponly"] and not new.cookies["ko_id"]["httponly"]
    only_copy = Client(HTTP_COOKIE=f"ko_id_server={visitor}").get("/who", HTTP_HOST="www.example.com")
    assert only_copy.json()["ko_id"] == visitor and only_copy.cookies["ko_id"].value == visitor
    assert "ko_id_server" not in only_copy.cookies
    both = Client(HTTP_COOKIE=f"ko_id={visitor}; ko_id_server={visitor}").get("/who", HTTP_HOST="www.example.com")
    assert not both.cookies

    reset = Client(HTTP_COOKIE=f"ko_id={ID}; ko_id_server={ID}").get("/logout", HTTP_HOST="www.example.com")
    after = reset.json()["after"]
    assert reset.json()["before"] == ID and after != ID
    assert reset.cookies["ko_id"].value == reset.cookies["ko_id_server"].value == after
    assert reset.cookies["ko_id"]["domain"] == "example.com"
    batches = {e["event"]: b["profile_id"] for b in delivered(koala_client, collector) for e in b.get("events", [])}
    assert batches == {"Before Reset": ID, "After Reset": after}
