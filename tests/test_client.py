"""KoalaClient: configuration, concurrent delivery, and flush that never hangs."""

from __future__ import annotations

import time
import uuid

import pytest

import koala_middleware
from koala_middleware import KoalaClient
from koala_middleware._client import DEFAULT_API_URL
from koala_middleware.testing import Collector


def test_public_api_is_pinned() -> None:
    assert sorted(koala_middleware.__all__) == sorted(
        [
            "AccountRecorder",
            "Batch",
            "DeliveryError",
            "DropReason",
            "ErrorHook",
            "KoalaASGIMiddleware",
            "KoalaClient",
            "KoalaWSGIMiddleware",
            "RequestInfo",
            "ShouldTrack",
            "Stats",
            "Tracker",
            "__version__",
            "current_tracker",
            "pixel_snippet",
        ]
    )
    for name in koala_middleware.__all__:
        assert hasattr(koala_middleware, name)


def test_key_and_url_fall_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOALA_PUBLIC_KEY", "pk_env")
    monkeypatch.setenv("KOALA_API_URL", "http://127.0.0.1:9/")
    client = KoalaClient()
    assert client.public_key == "pk_env" and client.api_url == "http://127.0.0.1:9"
    assert not client.dry_run
    explicit = KoalaClient("pk_arg", api_url="https://koala.internal")
    assert explicit.public_key == "pk_arg" and explicit.api_url == "https://koala.internal"


def test_defaults_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOALA_PUBLIC_KEY", raising=False)
    monkeypatch.delenv("KOALA_API_URL", raising=False)
    client = KoalaClient()
    assert client.api_url == DEFAULT_API_URL == "https://api2.getkoala.com"
    assert client.dry_run and client.public_key is None


def test_bad_configuration_says_how_to_fix_it() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'retries'"):
        KoalaClient("pk", retries=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="public key"):
        KoalaClient("pk with spaces/../")
    with pytest.raises(ValueError, match="api_url must start with http"):
        KoalaClient("pk", api_url="api2.getkoala.com")
    with pytest.raises(TypeError, match="on_error must be a callable"):
        KoalaClient("pk", on_error="log")


def test_batches_are_sent_concurrently() -> None:
    """200 batches to a collector that takes 200 ms each arrive in far less than 200 x 200 ms."""
    with Collector(delay=0.2) as koala:
        client = KoalaClient("pk_test", api_url=koala.url)
        started = time.monotonic()
        for n in range(200):
            with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
                tracker.track("Bulk", {"n": n})
        handed_over = time.monotonic() - started
        assert client.flush(timeout=30)
        elapsed = time.monotonic() - started
        client.shutdown(1)
        assert len(koala.requests()) == 200
        assert sorted(e["properties"]["n"] for e in koala.events()) == list(range(200))
    assert client.stats.delivered == 200 and client.stats.dropped == {}
    assert handed_over < 1.0, "handing over must not wait for the network"
    # One at a time would take 40 s; 50 in flight about 0.8 s. Allow a slow CI machine.
    assert elapsed < 8.0, f"took {elapsed:.1f}s: batches were not sent concurrently"


def test_flush_returns_within_its_timeout_when_koala_never_answers() -> None:
    with Collector() as koala:
        koala.hang()
        client = KoalaClient("pk_test", api_url=koala.url, timeout=30)
        with client.tracker(email="ada@example.com") as tracker:
            tracker.track("Stuck")
        started = time.monotonic()
        assert client.flush(timeout=1) is False
        elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 1.5
        assert client.stats.queued == 1
        client.shutdown(timeout=0.5)


def test_flush_with_nothing_pending_is_immediate(client: KoalaClient) -> None:
    started = time.monotonic()
    assert client.flush(timeout=5)
    assert time.monotonic() - started < 0.5


def test_middleware_options_are_split_from_client_options(collector: Collector) -> None:
    from koala_middleware.wsgi import KoalaWSGIMiddleware

    def app(environ, start_response):  # pragma: no cover - never called
        raise AssertionError

    middleware = KoalaWSGIMiddleware(
        app, public_key="pk_test", api_url=collector.url, cookie_domain="example.com", respect_gpc=False
    )
    assert middleware.client.public_key == "pk_test"
    assert middleware.visits.settings.cookie.domain == "example.com"
    assert middleware.visits.settings.respect_gpc is False
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['cookie_flavour'\]"):
        KoalaWSGIMiddleware(app, cookie_flavour="choc")
    with pytest.raises(TypeError, match="pass client options"):
        KoalaWSGIMiddleware(app, client=middleware.client, timeout=3)


def test_describe_shows_a_batch_as_koala_would_receive_it() -> None:
    client = KoalaClient(dry_run=True)
    with client.tracker(email="ada@example.com", user_agent="UA/1") as tracker:
        tracker.track("Signed Up")
    [batch] = client.dry_run_batches
    text = client.describe(batch)
    lines = text.splitlines()
    assert lines[0] == "POST https://api2.getkoala.com/web/projects/<your public key>/batch"
    assert lines[1] == "User-Agent: UA/1"
    assert '  "email": "ada@example.com",' in lines
    assert __import__("json").loads("\n".join(lines[2:])) == batch.json()
