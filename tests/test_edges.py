"""Issue 21's sharp edges, one test (or a few) per numbered finding, each failing on the code
before the fix: double wrapping, option checking, error messages naming the user's keyword,
the public types, a client address that is not an IP, and cookies and odd requests.

The apps are called directly, as a server would (the protocol checks of each stack are in
test_wsgi.py, test_asgi.py and test_django.py).
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import logging
import os
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

import koala_middleware
from koala_middleware import (
    KoalaASGIMiddleware,
    KoalaClient,
    KoalaWSGIMiddleware,
    RequestInfo,
    Tracker,
    current_tracker,
)
from koala_middleware._client import ClientOptions
from koala_middleware._visit import VisitorOptions, configure
from koala_middleware.asgi import SCOPE_KEY
from koala_middleware.wsgi import ENVIRON_KEY

ID_A = "0b6f3c1e-2d4a-4f5b-8c7d-9e0f1a2b3c4d"
ID_B = "11111111-2222-4333-8444-555555555555"


# -- harness ---------------------------------------------------------------------------------


def wsgi_environ(**extra: Any) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "SERVER_NAME": "www.example.com",
        "SERVER_PORT": "80",
        "HTTP_HOST": "www.example.com",
        "HTTP_USER_AGENT": "edge-test",
        "REMOTE_ADDR": "203.0.113.7",
        "wsgi.url_scheme": "http",
    }
    environ.update(extra)
    return environ


def tracking_wsgi_app(seen: list[Tracker], headers: Iterable[tuple[str, str]] = ()) -> Any:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        tracker = environ[ENVIRON_KEY]
        assert tracker is current_tracker()
        seen.append(tracker)
        tracker.track("Viewed Page")
        start_response("200 OK", [("Content-Type", "text/plain"), *headers])
        return [b"ok"]

    return app


def wsgi_call(app: Any, environ: dict[str, Any]) -> list[tuple[str, str]]:
    """Call, iterate and close, as a PEP 3333 server does; the response headers."""
    got: list[tuple[str, str]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        got[:] = headers
        return lambda chunk: None

    result = app(environ, start_response)
    try:
        list(result)
    finally:
        getattr(result, "close", lambda: None)()
    return got


def set_cookies(headers: Iterable[tuple[Any, Any]]) -> list[str]:
    values = [
        v.decode() if isinstance(v, bytes) else v for k, v in headers if k.lower() in ("set-cookie", b"set-cookie")
    ]
    return [v for v in values if v.startswith("ko_id=")]


def asgi_scope(headers: list[tuple[bytes, bytes]] | None = None, **extra: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"www.example.com"), (b"user-agent", b"edge-test")] if headers is None else headers,
        "client": ("203.0.113.7", 50000),
        "server": ("www.example.com", 80),
    }
    scope.update(extra)
    return scope


def tracking_asgi_app(seen: list[Tracker], headers: Iterable[tuple[bytes, bytes]] = ()) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        tracker = scope[SCOPE_KEY]
        seen.append(tracker)
        tracker.track("Viewed Page")
        await send({"type": "http.response.start", "status": 200, "headers": [*headers]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def asgi_call(app: Any, scope: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    got: list[tuple[bytes, bytes]] = []

    received: list[bool] = []

    async def receive() -> dict[str, Any]:
        if received:  # after the body, a server only answers when the client goes away
            await asyncio.Event().wait()
        received.append(True)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            got[:] = message.get("headers", [])

    asyncio.run(app(scope, receive, send))
    return got


def visitor_batches(client: KoalaClient) -> list[dict[str, Any]]:
    return [batch.json() for batch in client.dry_run_batches if batch.path == "/batch"]


# -- 1. applied twice, one visitor -------------------------------------------------------------


def test_wsgi_applied_twice_gives_a_new_visitor_one_id() -> None:
    outer_client, inner_client = KoalaClient(dry_run=True), KoalaClient(dry_run=True)
    seen: list[Tracker] = []
    app = KoalaWSGIMiddleware(KoalaWSGIMiddleware(tracking_wsgi_app(seen), client=inner_client), client=outer_client)
    (cookie,) = set_cookies(wsgi_call(app, wsgi_environ()))
    assert cookie.startswith(f"ko_id={seen[0].profile_id};")
    assert [b["profile_id"] for b in visitor_batches(outer_client)] == [seen[0].profile_id]
    assert not inner_client.dry_run_batches


def test_asgi_applied_twice_gives_a_new_visitor_one_id() -> None:
    outer_client, inner_client = KoalaClient(dry_run=True), KoalaClient(dry_run=True)
    seen: list[Tracker] = []
    app = KoalaASGIMiddleware(KoalaASGIMiddleware(tracking_asgi_app(seen), client=inner_client), client=outer_client)
    (cookie,) = set_cookies(asgi_call(app, asgi_scope()))
    assert cookie.startswith(f"ko_id={seen[0].profile_id};")
    assert [b["profile_id"] for b in visitor_batches(outer_client)] == [seen[0].profile_id]
    assert not inner_client.dry_run_batches


@pytest.fixture
def django_inner_client() -> Iterator[KoalaClient]:
    """Django's KoalaMiddleware (tests/django_project) with a client of its own."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")
    import django

    django.setup()
    from django.test import override_settings

    inner = KoalaClient(dry_run=True)
    with override_settings(KOALA={"client": inner}, ALLOWED_HOSTS=["*"]):
        yield inner


@pytest.mark.parametrize("stack", ["wsgi", "asgi"])
def test_django_under_an_outer_koala_gives_a_new_visitor_one_id(stack: str, django_inner_client: KoalaClient) -> None:
    outer = KoalaClient(dry_run=True)
    headers: Iterable[tuple[Any, Any]]
    if stack == "wsgi":
        from django.core.handlers.wsgi import WSGIHandler

        environ = wsgi_environ(PATH_INFO="/who", **{"wsgi.input": io.BytesIO()})
        headers = wsgi_call(KoalaWSGIMiddleware(WSGIHandler(), client=outer), environ)
    else:
        from django.core.handlers.asgi import ASGIHandler

        headers = asgi_call(KoalaASGIMiddleware(ASGIHandler(), client=outer), asgi_scope(path="/who", raw_path=b"/who"))
    (cookie,) = set_cookies(headers)
    assert cookie.startswith("ko_id=")
    assert not django_inner_client.dry_run_batches


# -- 2. numeric options checked where they are given -------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("timeout", "5", "timeout must be a positive number of seconds, got '5'"),
        ("timeout", 0, "timeout must be a positive number of seconds, got 0"),
        ("timeout", float("inf"), "timeout must be a positive number of seconds, got inf"),
        ("timeout", True, "timeout must be a positive number of seconds, got True"),
        ("max_in_flight", 0, "max_in_flight must be a whole number of at least 1, got 0"),
        ("max_in_flight", 2.5, "max_in_flight must be a whole number of at least 1, got 2.5"),
        ("max_queue_batches", 0, "max_queue_batches must be a whole number of at least 1, got 0"),
        ("max_queue_bytes", -1, "max_queue_bytes must be a whole number of at least 1, got -1"),
        ("max_retries", -1, "max_retries must be a whole number of at least 0, got -1"),
        ("backoff_base", -0.5, "backoff_base must be a number of seconds of at least 0, got -0.5"),
        ("max_backoff", "30", "max_backoff must be a number of seconds of at least 0, got '30'"),
        ("shutdown_timeout", -1, "shutdown_timeout must be a number of seconds of at least 0, got -1"),
        ("max_spool_bytes", 0, "max_spool_bytes must be a whole number of at least 1, got 0"),
        ("send_ip", "yes", "send_ip must be True or False, got 'yes'"),
        ("sync", 1, "sync must be True or False, got 1"),
        ("handle_sigterm", None, "handle_sigterm must be True or False, got None"),
        ("dry_run", "no", "dry_run must be True, False or None, got 'no'"),
        ("user_agent", 5, "user_agent must be a string or None, got 5"),
        ("proxy", 8080, "proxy must be a proxy URL string or None, got 8080"),
    ],
)
def test_client_options_are_checked_with_the_users_keyword(option: str, value: Any, message: str) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        KoalaClient(dry_run=True, **{option: value}) if option != "dry_run" else KoalaClient(dry_run=value)
    assert str(info.value) == message


def test_the_middlewares_check_client_options_too() -> None:
    with pytest.raises(ValueError, match="max_in_flight must be a whole number of at least 1, got 0"):
        KoalaWSGIMiddleware(tracking_wsgi_app([]), dry_run=True, max_in_flight=0)


@pytest.mark.parametrize(
    ("option", "value", "keyword"),
    [
        ("cookie_domain", "co.uk", "cookie_domain"),
        ("cookie_domain", 5, "cookie_domain"),
        ("cookie_name", "a b", "cookie_name"),
        ("cookie_max_age", "1", "cookie_max_age"),
        ("cookie_max_age", 0, "cookie_max_age"),
        ("cookie_secure", "yes", "cookie_secure"),
        ("cookie_samesite", "loose", "cookie_samesite"),
        ("cookie_server_copy", 1, "cookie_server_copy"),
        ("cookie_server_copy_name", "ko_id", "cookie_server_copy_name"),
        ("allowed_hosts", "example.com", "allowed_hosts"),
        ("allowed_hosts", ["http://x"], "allowed_hosts"),
        ("exclude_paths", "/healthz", "exclude_paths"),
        ("should_track", True, "should_track"),
        ("respect_gpc", "no", "respect_gpc"),
    ],
)
def test_visitor_option_errors_name_the_users_keyword(option: str, value: Any, keyword: str) -> None:
    # 3. Errors name the keyword the user wrote, never an internal class.
    with pytest.raises((TypeError, ValueError)) as info:
        KoalaWSGIMiddleware(tracking_wsgi_app([]), dry_run=True, **{option: value})
    assert str(info.value).startswith(keyword + " ")
    assert "CookieSettings" not in str(info.value)


def test_the_typed_option_lists_and_the_signatures_agree() -> None:
    client_params = {
        name: p for name, p in inspect.signature(KoalaClient).parameters.items() if p.kind is not p.VAR_KEYWORD
    }
    client_hints = typing.get_type_hints(ClientOptions)
    assert set(client_hints) == set(client_params)
    configure_params = {name for name, p in inspect.signature(configure).parameters.items() if p.kind is p.KEYWORD_ONLY}
    visitor_hints = typing.get_type_hints(VisitorOptions)
    assert set(visitor_hints) == set(client_hints) | configure_params
    from typing_extensions import Unpack

    signature_hints = typing.get_type_hints(configure, localns={"Unpack": Unpack})
    for name in configure_params:
        assert visitor_hints[name] == signature_hints[name], name
    init_hints = typing.get_type_hints(KoalaClient.__init__)
    for name in client_params:
        assert client_hints[name] == init_hints[name], name


# -- 4. public types, no accidental public methods ---------------------------------------------


def test_hook_types_and_request_info_are_exported() -> None:
    from koala_middleware import ErrorHook, RequestInfo, ShouldTrack

    assert {"RequestInfo", "ShouldTrack", "ErrorHook", "DropReason"} <= set(koala_middleware.__all__)
    assert RequestInfo.__module__.startswith("koala_middleware")
    assert ShouldTrack is not None and ErrorHook is not None


def test_drop_reasons_are_a_literal_type_the_stats_keys_use() -> None:
    from koala_middleware import DropReason

    reasons = typing.get_args(DropReason)
    assert {"tracker_full", "cookie_withheld", "queue_full"} <= set(reasons)


def test_internal_hand_over_methods_are_not_public() -> None:
    for name in ("send_tracker", "count_dropped", "send"):
        assert not hasattr(KoalaClient, name), name
    assert not hasattr(Tracker, "take")


# -- 5. ip only when it is one -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "ip"),
    [
        (("testclient", 50000), None),
        (("/run/app.sock", 0), None),
        ((b"203.0.113.9", 1), None),
        (("2001:db8::1", 1), "2001:db8::1"),
        (("203.0.113.9", 1), "203.0.113.9"),
        ([], None),
        (None, None),
    ],
)
def test_asgi_ip_is_sent_only_when_it_parses(client: Any, ip: str | None) -> None:
    dry = KoalaClient(dry_run=True)
    asgi_call(KoalaASGIMiddleware(tracking_asgi_app([]), client=dry), asgi_scope(client=client))
    (batch,) = visitor_batches(dry)
    assert batch.get("ip") == ip


@pytest.mark.parametrize(
    ("remote_addr", "ip"),
    [("unix:", None), (b"203.0.113.9", None), (17, None), ("", None), (" 203.0.113.9 ", None), ("::1", "::1")],
)
def test_wsgi_ip_is_sent_only_when_it_parses_and_the_batch_is_never_lost(remote_addr: Any, ip: str | None) -> None:
    dry = KoalaClient(dry_run=True)
    wsgi_call(KoalaWSGIMiddleware(tracking_wsgi_app([]), client=dry), wsgi_environ(REMOTE_ADDR=remote_addr))
    (batch,) = visitor_batches(dry)
    assert batch.get("ip") == ip


# -- 6. cookies as browsers send them, caches as RFC 9111 judges them, odd requests ------------


def test_a_comma_inside_another_cookies_value_cannot_set_the_visitor_id() -> None:
    seen: list[Tracker] = []
    app = KoalaWSGIMiddleware(tracking_wsgi_app(seen), client=KoalaClient(dry_run=True))
    headers = wsgi_call(app, wsgi_environ(HTTP_COOKIE=f"prefs=a,ko_id={ID_B}; ko_id={ID_A}"))
    assert seen[0].profile_id == ID_A
    copies = [v for k, v in headers if k == "Set-Cookie" and v.startswith("ko_id_server=")]
    assert copies and copies[0].startswith(f"ko_id_server={ID_A};")


@pytest.mark.parametrize(
    ("cache_control", "cookie"),
    [
        ("max-age=600", False),
        ("s-maxage=60", False),
        ("public", False),
        ("public, max-age=600", False),
        ("max-age=600, private", True),
        ("max-age=600, no-store", True),
        ('private="set-cookie", max-age=600', True),
        ("no-cache", True),
        ("must-revalidate", True),
        (None, True),
    ],
)
def test_responses_a_shared_cache_may_store_get_no_cookie(cache_control: str | None, cookie: bool) -> None:
    headers = [("Cache-Control", cache_control)] if cache_control else []
    app = KoalaWSGIMiddleware(tracking_wsgi_app([], headers), client=KoalaClient(dry_run=True))
    assert bool(set_cookies(wsgi_call(app, wsgi_environ()))) is cookie


def every_rule(decisions: list[RequestInfo]) -> dict[str, Any]:
    """Options that make every rule read the request: an exclusion, and a consent callback
    that notes what it was given and says yes."""

    def should_track(info: RequestInfo) -> bool:
        decisions.append(info)
        return True

    return {"exclude_paths": ["/static"], "should_track": should_track}


@pytest.mark.parametrize(
    "extra",
    [
        {"PATH_INFO": b"/healthz"},
        {"PATH_INFO": None},
        {"HTTP_COOKIE": [f"ko_id={ID_A}"]},
        {"HTTP_COOKIE": f"ko_id={ID_A}".encode()},
        {"HTTP_HOST": b"www.example.com"},
        {"HTTP_USER_AGENT": b"edge"},
        {"REQUEST_METHOD": None},
        {"wsgi.url_scheme": None},
    ],
)
def test_odd_wsgi_environs_neither_raise_nor_lose_the_batch(extra: dict[str, Any]) -> None:
    dry = KoalaClient(dry_run=True)
    decisions: list[RequestInfo] = []
    seen: list[Tracker] = []
    app = KoalaWSGIMiddleware(tracking_wsgi_app(seen), client=dry, **every_rule(decisions))
    wsgi_call(app, wsgi_environ(**extra))
    assert seen and decisions  # the consent callback saw the request: every rule ran
    assert len(visitor_batches(dry)) == 1


@pytest.mark.parametrize(
    "extra",
    [
        {"path": b"/healthz"},
        {"path": None},
        {"root_path": None},
        {"headers": None},
        {"headers": ()},
        {"client": (b"203.0.113.9", 1)},
        {"client": "203.0.113.9"},
        {"scheme": None},
        {"server": None},
        {"method": None},
    ],
)
def test_odd_asgi_scopes_neither_raise_nor_lose_the_batch(extra: dict[str, Any]) -> None:
    dry = KoalaClient(dry_run=True)
    decisions: list[RequestInfo] = []
    seen: list[Tracker] = []
    scope = asgi_scope(**extra)
    if "headers" in extra and extra["headers"] is None:
        del scope["headers"]
    app = KoalaASGIMiddleware(tracking_asgi_app(seen), client=dry, **every_rule(decisions))
    asgi_call(app, scope)
    assert seen and decisions
    assert len(visitor_batches(dry)) == 1


def test_an_excluded_bytes_path_is_still_excluded() -> None:
    seen: list[Tracker] = []
    app = KoalaWSGIMiddleware(tracking_wsgi_app(seen), client=KoalaClient(dry_run=True), exclude_paths=["/healthz"])
    assert not set_cookies(wsgi_call(app, wsgi_environ(PATH_INFO=b"/healthz")))
    assert not seen[0].enabled


@pytest.mark.parametrize("value", ["1", " 1", "1,1", "1, 1", "1 "])
def test_wsgi_honours_sec_gpc_as_asgi_does(value: str) -> None:
    seen: list[Tracker] = []
    app = KoalaWSGIMiddleware(tracking_wsgi_app(seen), client=KoalaClient(dry_run=True))
    assert not set_cookies(wsgi_call(app, wsgi_environ(HTTP_SEC_GPC=value)))
    assert not seen[0].enabled
    scope = asgi_scope(headers=[(b"host", b"www.example.com"), (b"sec-gpc", value.encode())])
    seen_asgi: list[Tracker] = []
    assert not set_cookies(asgi_call(KoalaASGIMiddleware(tracking_asgi_app(seen_asgi), dry_run=True), scope))
    assert not seen_asgi[0].enabled


@pytest.mark.parametrize("value", ["0", "", "10", "yes"])
def test_other_sec_gpc_values_are_no_opt_out(value: str) -> None:
    seen: list[Tracker] = []
    app = KoalaWSGIMiddleware(tracking_wsgi_app(seen), client=KoalaClient(dry_run=True))
    assert set_cookies(wsgi_call(app, wsgi_environ(HTTP_SEC_GPC=value)))


def test_no_odd_request_is_logged_as_a_lost_batch(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="koala_middleware")
    dry = KoalaClient(dry_run=True)
    wsgi_call(KoalaWSGIMiddleware(tracking_wsgi_app([]), client=dry), wsgi_environ(REMOTE_ADDR=b"\x01"))
    assert not caplog.records
    assert json.loads(json.dumps(visitor_batches(dry)))


def test_every_option_has_a_documented_row() -> None:
    """The docs' option tables are generated (scripts/docs_hooks.py) from the signatures of
    ``KoalaClient`` and ``configure`` and their ``:param`` lines: each option has one."""
    import re

    documented = set(re.findall(r"^\s*:param (\w+):", (KoalaClient.__doc__ or "") + (configure.__doc__ or ""), re.M))
    missing = set(typing.get_type_hints(VisitorOptions)) - documented
    assert not missing, f"options without a ':param' line: {sorted(missing)}"


# -- 7. structure: request state apart from recording, test-only code out of the package -------


def test_the_recording_tracker_holds_no_request_state() -> None:
    from koala_middleware._tracker import RequestTracker

    tracker = KoalaClient(dry_run=True).tracker(email="ada@example.com")
    for name in ("_request", "_visits", "_set_cookies"):
        assert not hasattr(tracker, name), name
        assert name in RequestTracker.__slots__


def test_test_only_cookie_functions_are_out_of_the_package() -> None:
    from koala_middleware import _cookie

    for name in ("new_visitor_id", "is_valid_visitor_id", "read_visitor_id", "set_cookie_header"):
        assert not hasattr(_cookie, name), name


def test_flask_names_the_config_key_a_wrong_value_came_from() -> None:
    from flask import Flask

    from koala_middleware.flask import Koala

    app = Flask(__name__)
    app.config["KOALA_TIMEOUT"] = "5"
    with pytest.raises(TypeError, match=r"^app.config\['KOALA_TIMEOUT'\]: timeout must be a positive number"):
        Koala(app, dry_run=True)
    app = Flask(__name__)
    with pytest.raises(ValueError, match=r"^cookie_domain 'co.uk' is a public suffix"):
        Koala(app, dry_run=True, cookie_domain="co.uk")
