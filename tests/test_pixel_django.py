"""The first-party pixel in Django (``settings.KOALA["pixel_path"]``), through Django's own
test clients, sync and async, against the loopback stand-ins for Koala's API and CDN; and the
``{% koala_pixel %}`` template tag."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")
import django

django.setup()

from django.template import Context, Engine  # noqa: E402
from django.test import AsyncClient, Client, override_settings  # noqa: E402
from pixel_upstreams import Upstream, upstreams  # noqa: E402

from koala_middleware import KoalaClient  # noqa: E402

UA = "Mozilla/5.0 (X11; Linux x86_64) django-pixel"


@pytest.fixture(scope="module")
def stand_ins() -> Iterator[tuple[Upstream, Upstream]]:
    with upstreams() as pair:
        yield pair


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def pixel_settings(stand_ins: tuple[Upstream, Upstream]) -> Iterator[None]:
    api, cdn = stand_ins
    options = {
        "client": KoalaClient("pk_test", dry_run=True),
        "pixel_path": "/_k",
        "pixel_api_url": api.url,
        "pixel_cdn_url": cdn.url,
        "pixel_timeout": 1.5,
    }
    with override_settings(KOALA=options):
        yield


def test_sync_stack_proxies_with_cookies_filtered(pixel_settings: None, stand_ins: tuple[Upstream, Upstream]) -> None:
    api, _ = stand_ins
    client = Client(HTTP_USER_AGENT=UA)
    client.cookies["ko_id"] = "abc"
    client.cookies["sessionid"] = "secret"
    marker = uuid.uuid4().hex
    response = client.post(
        f"/_k/web/projects/pk_test/{marker}?q=1",
        data=b'{"a": 1}',
        content_type="application/json",
        HTTP_AUTHORIZATION="Bearer x",
    )
    assert response.status_code == 200
    assert b"".join(response.streaming_content).startswith(b'{"method": "POST"')  # type: ignore[attr-defined]
    seen = [s for s in api.seen if marker in s.path][-1]
    assert seen.path == f"/web/projects/pk_test/{marker}?q=1"
    assert seen.body == b'{"a": 1}'
    assert seen.headers["cookie"] == "ko_id=abc"
    assert "authorization" not in seen.headers
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"
    script = client.get("/_k/v1/pk_test/sdk.js")
    assert script["Content-Type"] == "application/javascript"
    assert b"stand-in sdk.js" in b"".join(script.streaming_content)  # type: ignore[attr-defined]
    cookies = client.get("/_k/cookies", HTTP_HOST="app.example.com")
    assert sorted(cookies.cookies) == ["ko_far", "ko_near", "ko_sid"]
    assert cookies.cookies["ko_far"]["domain"] == ""
    assert client.get("/_k//evil.test/x").status_code == 400
    assert client.post("/_k/web/x", data=b"x" * (1024 * 1024 + 1), content_type="text/plain").status_code == 413
    assert client.get("/who").status_code == 200  # the app's own views still answer


@pytest.mark.anyio
async def test_async_stack_proxies(pixel_settings: None, stand_ins: tuple[Upstream, Upstream]) -> None:
    api, _ = stand_ins
    client = AsyncClient(HTTP_USER_AGENT=UA)
    client.cookies["ko_id"] = "abc"
    client.cookies["sessionid"] = "secret"
    marker = uuid.uuid4().hex
    response = await client.get(f"/_k/web/{marker}")
    assert response.status_code == 200
    body = b"".join([chunk async for chunk in response.streaming_content])  # type: ignore[attr-defined]
    assert marker.encode() in body
    seen = [s for s in api.seen if marker in s.path][-1]
    assert seen.headers["cookie"] == "ko_id=abc"
    redirect = await client.get("/_k/redirect")
    assert redirect.status_code == 302 and redirect["Location"] == "/_k/web/after-redirect"


def test_template_tag(pixel_settings: None) -> None:
    engine = Engine(libraries={"koala": "koala_middleware.templatetags.koala"})
    html = engine.from_string('{% load koala %}{% koala_pixel nonce="n0nce" %}').render(Context())
    assert '<script nonce="n0nce">' in html
    assert '"/v1/pk_test/sdk.js"' in html and '"/_k"' in html


def test_template_tag_without_pixel_path_says_what_to_set() -> None:
    engine = Engine(libraries={"koala": "koala_middleware.templatetags.koala"})
    with (
        override_settings(KOALA={"client": KoalaClient("pk_test", dry_run=True)}),
        pytest.raises(RuntimeError, match=r'settings.KOALA\["pixel_path"\]'),
    ):
        engine.from_string("{% load koala %}{% koala_pixel %}").render(Context())
