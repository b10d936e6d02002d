"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import gc
import inspect
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from koala_middleware import KoalaClient, _cookie
from koala_middleware._cookie import CookieSettings, VisitorCookie
from koala_middleware._delivery import DeliverySettings

#: Fast retries so fault tests take seconds, not minutes.
FAST_RETRIES: dict[str, Any] = {"backoff_base": 0.02, "max_backoff": 0.2, "timeout": 2.0}


def run_tour(example: Path, home: Path) -> str:
    """Run an example's ``--tour`` offline, as a user would, and return what it printed.

    No KOALA_PUBLIC_KEY / KOALA_API_URL from the caller's environment: the tour needs neither.
    """
    root = Path(__file__).resolve().parent.parent
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, str(example), "--tour"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def assert_no_garbage_cycles(run: Callable[[], None]) -> None:
    """``run()`` once to warm up (caches, lazily built tables), then again with the garbage
    collector off: it must leave nothing that only the collector could free."""
    run()
    gc.collect()
    gc.disable()
    try:
        run()
        assert gc.collect() == 0
    finally:
        gc.enable()


def delivery_settings(**overrides: Any) -> DeliverySettings:
    """The sender's settings as ``KoalaClient()`` makes them by default, with ``overrides``."""
    fields = DeliverySettings.__dataclass_fields__
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(KoalaClient).parameters.items()
        if name in fields
    }
    return DeliverySettings(**{"base_url": "http://127.0.0.1:9", **defaults, **overrides})


# -- the visitor cookie, read and written as one header at a time (tests of _cookie.py) ------
# Test-only views of koala_middleware._cookie: the middlewares use VisitorCookie.


def new_visitor_id() -> str:
    """A fresh id in the format the pixel generates (a lower-case UUID v4)."""
    return VisitorCookie(CookieSettings()).issue()


def is_valid_visitor_id(value: str) -> bool:
    """Only ids Koala's pixel or server may have written are kept (16 to 64 URL-safe
    characters, not the nil UUID)."""
    return isinstance(value, str) and 16 <= len(value) <= 64 and _cookie._VISITOR_ID_RE.fullmatch(value) is not None


def read_visitor_id(cookie_headers: str | Iterable[str] | None, name: str = "ko_id") -> str | None:
    """The first valid visitor id among all ``name`` cookies of all Cookie headers."""
    if cookie_headers is None:
        return None
    if isinstance(cookie_headers, str):
        cookie_headers = (cookie_headers,)
    return _cookie._search_visitor_id(cookie_headers, name)


def set_cookie_header(visitor_id: str, host: str | None, https: bool, settings: CookieSettings) -> str:
    """The ``ko_id`` Set-Cookie value for ``visitor_id`` (never HttpOnly: the pixel reads it)."""
    if not is_valid_visitor_id(visitor_id):
        raise ValueError("visitor_id must be a visitor id: 16 to 64 of A-Z a-z 0-9 _ - (see new_visitor_id())")
    return VisitorCookie(settings).set_cookies(visitor_id, _cookie.WRITE_ID, host, https)[0]
