"""The Flask extension: ``Koala(app)`` and ``request.koala``, with Flask's test client.

Real Flask apps, the local collector as Koala. Flask's test client closes a response (and so
the middleware hands the tracker over, as a server would) on ``buffered=True`` or
``response.close()``; tests that look at delivery use one of those.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from flask import Flask, Request, request, stream_with_context
from werkzeug.middleware.proxy_fix import ProxyFix

from helpers import run_tour
from koala_middleware import KoalaClient, current_tracker
from koala_middleware.flask import Koala, KoalaRequestMixin
from koala_middleware.testing import Collector
from koala_middleware.wsgi import ENVIRON_KEY

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flask_app" / "app.py"
UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0 flask-test"
VISITOR = "5e7c1b2a-9f3d-4c8e-a1b2-c3d4e5f6a7b8"


class Boom(Exception):
    pass


def make_app(client: KoalaClient, **options: object) -> Flask:
    app = Flask(__name__)
    Koala(app, client=client, **options)

    @app.get("/")
    def home() -> str:
        assert request.koala is request.environ[ENVIRON_KEY] is current_tracker()
        request.koala.track("Viewed Home", {"path": request.path})
        return request.koala.profile_id or "-"

    @app.get("/quiet")
    def quiet() -> str:
        return "nothing recorded"

    @app.get("/boom")
    def boom() -> str:
        request.koala.track("Started Checkout")
        raise Boom("handler failed")

    return app


def ko_id_cookies(response: object) -> list[str]:
    return [c for c in response.headers.getlist("Set-Cookie") if c.startswith("ko_id=")]  # type: ignore[attr-defined]


# -- wiring ----------------------------------------------------------------------------------


def test_request_koala_is_this_requests_tracker_and_its_batch_reaches_koala(
    client: KoalaClient, collector: Collector
) -> None:
    app = make_app(client)
    assert app.extensions["koala"].client is client
    browser = app.test_client()
    response = browser.get("/", headers={"User-Agent": UA}, environ_base={"REMOTE_ADDR": "198.51.100.23"})
    visitor_id = response.text
    assert response.status_code == 200 and ko_id_cookies(response)[0].startswith(f"ko_id={visitor_id};")
    assert client.stats.enqueued == 0  # handed over when the response is closed, not before
    response.close()
    assert collector.wait_for(1)
    (received,) = collector.requests()
    assert received.headers["user-agent"] == UA
    body = received.json()
    assert (body["profile_id"], body["ip"]) == (visitor_id, "198.51.100.23")
    assert [(e["event"], e["properties"]) for e in body["events"]] == [("Viewed Home", {"path": "/"})]
    browser.get("/quiet", buffered=True)
    assert client.flush(5) and client.stats.enqueued == 1  # nothing recorded: no batch


def test_init_app_for_app_factories_can_share_one_client_and_checks_its_input() -> None:
    shared = KoalaClient(dry_run=True)
    koala = Koala(client=shared, exclude_paths=["/healthz"])
    apps = [Flask("first"), Flask("second")]
    for app in apps:
        koala.init_app(app)
        app.add_url_rule("/healthz", "healthz", lambda: "ok" if not request.koala.enabled else "tracked")
        assert app.extensions["koala"].client is shared
        assert app.test_client().get("/healthz", buffered=True).text == "ok"
    with pytest.raises(RuntimeError, match="already set up"):
        koala.init_app(apps[0])
    with pytest.raises(TypeError, match="needs a Flask app"):
        koala.init_app(lambda environ, start_response: [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"unknown option.*'exclude_path'"):
        Koala(Flask("typo"), exclude_path=["/healthz"])  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="not alongside client="):
        Koala(Flask("both"), client=KoalaClient(dry_run=True), public_key="pk_test")
    app = Flask("made")
    made = Koala(app, public_key="pk_test", api_url="http://127.0.0.1:9")
    with app.app_context():
        assert made.client.public_key == "pk_test" and made.client.api_url == "http://127.0.0.1:9"


def test_init_app_reads_koala_settings_from_app_config_and_arguments_win() -> None:
    koala = Koala(cookie_domain="example.com")
    apps = []
    for name, key in (("first", "pk_first"), ("second", "pk_second")):
        app = Flask(name)
        app.config.update(
            KOALA_PUBLIC_KEY=key,
            KOALA_API_URL=f"http://127.0.0.1:9/{name}",
            KOALA_COOKIE_DOMAIN="ignored.example",  # the constructor's argument wins
            KOALA_EXCLUDE_PATHS=["/healthz"],
        )
        koala.init_app(app)
        apps.append(app)
    first, second = (app.extensions["koala"] for app in apps)
    assert first.client is not second.client  # each app keeps its own state
    assert (first.client.public_key, first.client.api_url) == ("pk_first", "http://127.0.0.1:9/first")
    assert second.client.public_key == "pk_second"
    assert first.visits.settings.cookie.domain == "example.com"
    assert first.visits.settings.exclude_paths == ("/healthz",)
    shared = Koala(client=KoalaClient(dry_run=True))
    app = Flask("shared")
    app.config["KOALA_PUBLIC_KEY"] = "pk_config"  # a client option: the shared client's own config wins
    shared.init_app(app)
    assert app.extensions["koala"].client is shared.client and shared.client.public_key is None
    for made in (first, second):
        made.client.shutdown(0)


# -- the ko_id cookie through Flask --------------------------------------------------------


def test_new_visitor_gets_a_cookie_and_a_returning_one_keeps_it() -> None:
    browser = make_app(KoalaClient(dry_run=True)).test_client()
    first = browser.get("/", buffered=True)
    (cookie,) = ko_id_cookies(first)
    assert cookie == f"ko_id={first.text}; Path=/; Max-Age=31536000; SameSite=Lax"  # Host: localhost
    again = browser.get("/", buffered=True)  # the test client sends the cookie back
    assert again.text == first.text and ko_id_cookies(again) == []


def test_forged_cookie_is_replaced_and_not_reflected() -> None:
    browser = make_app(KoalaClient(dry_run=True)).test_client()
    forged = '"><script>alert(1)</script>'
    browser.set_cookie("ko_id", forged)
    response = browser.get("/", buffered=True)
    (cookie,) = ko_id_cookies(response)
    assert response.text != forged and cookie.startswith(f"ko_id={response.text};")
    assert "script" not in cookie and "script" not in response.text
    browser.set_cookie("ko_id", VISITOR)
    assert browser.get("/", buffered=True).text == VISITOR


@pytest.mark.parametrize("proxy_first", [True, False], ids=["ProxyFix-then-Koala", "Koala-then-ProxyFix"])
def test_proxyfix_in_either_order_gives_the_visitors_address_host_and_scheme(proxy_first: bool) -> None:
    app = Flask(__name__)
    if proxy_first:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    Koala(app, client=KoalaClient(dry_run=True))
    if not proxy_first:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    app.add_url_rule("/", "ip", lambda: request.koala.ip or "-")
    headers = {
        "X-Forwarded-For": "203.0.113.50",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "app.example.com",
    }
    response = app.test_client().get("/", headers=headers, environ_base={"REMOTE_ADDR": "10.1.2.3"}, buffered=True)
    assert response.text == "203.0.113.50"
    (cookie,) = ko_id_cookies(response)
    assert "; Domain=example.com;" in cookie and cookie.endswith("; Secure")


def test_without_proxy_handling_x_forwarded_for_is_not_trusted() -> None:
    app = Flask(__name__)
    Koala(app, client=KoalaClient(dry_run=True))
    app.add_url_rule("/", "ip", lambda: request.koala.ip or "-")
    response = app.test_client().get(
        "/", headers={"X-Forwarded-For": "203.0.113.50"}, environ_base={"REMOTE_ADDR": "10.1.2.3"}
    )
    assert response.text == "10.1.2.3"


# -- request_class, excluded paths, no middleware -------------------------------------------


def test_a_custom_request_class_keeps_working() -> None:
    class LocaleRequest(Request):
        @property
        def locale(self) -> str:
            return self.headers.get("Accept-Language", "en")[:2]

    app = Flask(__name__)
    app.request_class = LocaleRequest
    Koala(app, client=KoalaClient(dry_run=True))
    assert issubclass(app.request_class, LocaleRequest)

    @app.get("/")
    def home() -> str:
        assert isinstance(request._get_current_object(), LocaleRequest)  # type: ignore[attr-defined]
        return f"{request.locale} {request.koala.profile_id}"  # type: ignore[attr-defined]

    locale, visitor_id = app.test_client().get("/", headers={"Accept-Language": "fr-FR"}).text.split()
    assert locale == "fr" and len(visitor_id) == 36


def test_a_request_class_that_already_has_koala_is_left_alone() -> None:
    class AppRequest(KoalaRequestMixin, Request):
        pass

    app = Flask(__name__)
    app.request_class = AppRequest
    Koala(app, client=KoalaClient(dry_run=True))
    assert app.request_class is AppRequest
    app.add_url_rule("/", "home", lambda: str(request.koala.enabled))
    assert app.test_client().get("/").text == "True"


def test_excluded_path_gives_a_disabled_tracker_that_still_checks_calls() -> None:
    client = KoalaClient(dry_run=True)
    app = Flask(__name__)
    Koala(app, client=client, exclude_paths=["/assets"])

    @app.get("/assets/<path:name>")
    def asset(name: str) -> str:
        with pytest.raises(TypeError, match="event name must be a str"):
            request.koala.track(42)  # type: ignore[arg-type]
        request.koala.track("Fetched Asset")
        return str(request.koala.enabled)

    response = app.test_client().get("/assets/app.css", buffered=True)
    assert response.text == "False" and ko_id_cookies(response) == []
    assert client.stats.dry_run == 0


def test_request_context_without_the_middleware_gets_a_disabled_tracker(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(KoalaClient(dry_run=True))
    caplog.set_level(logging.WARNING, logger="koala_middleware")
    with app.test_request_context("/"):
        tracker = request.koala
        assert not tracker.enabled and request.koala is tracker
        tracker.track("Unit Tested")  # no error, nothing kept
        assert tracker.batches() == []
    plain = Flask(__name__)
    plain.request_class = type("R", (KoalaRequestMixin, Request), {})
    with plain.test_request_context("/"), pytest.raises(RuntimeError, match=r"needs Koala\(app\)"):
        request.koala  # noqa: B018


# -- errors, streaming, a slow Koala ---------------------------------------------------------


def test_handler_that_tracks_then_raises_gets_flasks_500_and_its_events_are_sent(
    client: KoalaClient, collector: Collector
) -> None:
    app = make_app(client)
    browser = app.test_client()
    response = browser.get("/boom", headers={"User-Agent": UA}, buffered=True)
    assert response.status_code == 500  # Flask's own 500 still carries the new visitor's cookie
    assert collector.wait_for(1)
    assert [e["event"] for e in collector.events()] == ["Started Checkout"]
    assert collector.requests()[0].headers["user-agent"] == UA
    app.testing = True  # PROPAGATE_EXCEPTIONS: the exception leaves the middleware unchanged
    with pytest.raises(Boom, match="handler failed"):
        browser.get("/boom")  # a returning visitor now: their id is held by the browser
    assert collector.wait_for(2)
    assert current_tracker() is None


def test_streaming_response_streams_and_events_tracked_while_streaming_are_sent_after_close(
    client: KoalaClient, collector: Collector
) -> None:
    app = Flask(__name__)
    Koala(app, client=client)
    progress: list[str] = []

    @app.get("/export")
    def export() -> object:
        @stream_with_context
        def rows() -> Iterator[str]:
            for n in range(3):
                progress.append(f"row {n}")
                yield f"row {n}\n"
            request.koala.track("Exported Rows", {"rows": 3})
            assert current_tracker() is request.koala

        return app.response_class(rows(), mimetype="text/plain")

    response = app.test_client().get("/export", headers={"User-Agent": UA})
    chunks = response.response  # the live iterable; the test client read one chunk to start
    assert progress == ["row 0"]
    assert next(iter(chunks)) == b"row 0\n" and progress == ["row 0"]
    assert next(iter(chunks)) == b"row 1\n" and progress == ["row 0", "row 1"]
    assert list(chunks) == [b"row 2\n"]
    assert client.stats.enqueued == 0
    response.close()
    assert collector.wait_for(1)
    assert [e["event"] for e in collector.events()] == ["Exported Rows"]
    assert collector.requests()[0].headers["user-agent"] == UA


def test_a_slow_koala_does_not_slow_responses() -> None:
    with Collector(delay=2) as slow:
        client = KoalaClient("pk_test", api_url=slow.url, timeout=10, backoff_base=0.02, max_backoff=0.2)
        try:
            browser = make_app(client).test_client()
            durations = []
            for _ in range(5):
                started = time.monotonic()
                response = browser.get("/", buffered=True)  # closed: the hand-over happened
                durations.append(time.monotonic() - started)
                assert response.status_code == 200
            assert max(durations) < 1.0, durations
            assert slow.wait_for(5, timeout=15)  # and everything still arrives
            assert [e["event"] for e in slow.events()] == ["Viewed Home"] * 5
        finally:
            client.shutdown(5)


# -- packaging and the example -------------------------------------------------------------


def test_the_core_package_imports_without_flask() -> None:
    code = (
        "import sys; sys.modules['flask'] = None\n"
        "import koala_middleware\n"
        "from koala_middleware.wsgi import KoalaWSGIMiddleware\n"
        "try:\n"
        "    import koala_middleware.flask\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'koala-middleware[flask]'" in result.stdout


def test_example_tour_runs_offline_and_shows_batches(tmp_path: Path) -> None:
    out = run_tour(EXAMPLE, tmp_path)
    assert "new visitor, Set-Cookie: ko_id=" in out
    assert "POST https://api2.getkoala.com/web/projects/<your public key>/batch" in out
    assert '"event": "Signed Up"' in out and '"domain": "acme-robotics.com"' in out
    assert "User-Agent: Mozilla/5.0" in out


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("koala_flask_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_app_sends_sign_ups_and_account_traits_to_koala(client: KoalaClient, collector: Collector) -> None:
    browser = load_example().create_app(client).test_client()
    assert browser.post("/signup", data={"name": "Grace", "email": "not an email"}, buffered=True).status_code == 400
    form = {"name": "Grace Hopper", "email": "grace@navy-labs.com"}
    assert browser.post("/signup", data=form, headers={"User-Agent": UA}, buffered=True).status_code == 302
    assert browser.post("/upgrade", data={"plan": "enterprise", "seats": "40"}, buffered=True).status_code == 302
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
    assert "Grace Hopper" in page and browser.get_cookie("ko_id").value in page  # type: ignore[union-attr]


def test_example_page_shows_the_tour_s_batches_in_dry_run_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOALA_PUBLIC_KEY", raising=False)
    example = load_example()
    example.tour(example.client)  # as main() does before serving, in dry-run mode
    page = example.app.test_client().get("/").text
    assert "Nothing yet" not in page and "ada@acme-robotics.com" in page
