"""Every Python code block of README.md and docs/ runs here, as a reader would copy it.

A block is run as a program, with ``KOALA_PUBLIC_KEY`` set and ``KOALA_API_URL`` pointing to
the local ``Collector``. A block preceded by ``<!-- snippet: NAME -->`` may have a check in
``CHECKS``: it drives the app the block defines through the framework's own test client,
and names the events that must then reach the collector. Functions named ``test_*`` in a
block are called with the ``koala_client`` and ``koala_collector`` fixtures, as pytest
would. ``<!-- snippet: fragment NAME -->`` marks a part of a program: not run, but
type-checked after the preamble ``PREAMBLES[NAME]``. Every block is type-checked with
``mypy --strict`` (one mypy run for all of them). See CONTRIBUTING.md.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import types
import wsgiref.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from koala_middleware import KoalaClient
from koala_middleware._exit import _live_clients
from koala_middleware.testing import Collector

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"(?:<!-- snippet: (?P<marker>[^>]*?) -->\n)?^```(?P<lang>\w*)\n(?P<code>.*?)^```", re.M | re.S)

#: What a fragment needs before it to type-check (its marker's name).
PREAMBLES = {
    "tracker": "from koala_middleware.flask import request\n",
    "readme-django": "",
    "django-asgi": "",
}


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    name: str
    fragment: bool
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}" + (f"[{self.name}]" if self.name else "")


def _snippets() -> list[Snippet]:
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            if match["lang"] != "python":
                continue
            words = (match["marker"] or "").split()
            fragment = words[:1] == ["fragment"]
            name = words[-1] if words and words != ["fragment"] else ""
            line = text.count("\n", 0, match.start("code"))
            found.append(Snippet(path, line, name, fragment, match["code"]))
    return found


SNIPPETS = _snippets()
RUNNABLE = [s for s in SNIPPETS if not s.fragment]


# -- checks: drive the app a snippet defines, name the events that must reach Koala ------------


def _flask_signup(ns: dict[str, Any]) -> list[str]:
    form = {"email": "ada@example.com", "name": "Ada"}
    with ns["app"].test_client().post("/signup", data=form) as response:
        assert response.status_code == 200, response.data
    return ["Signed Up"]


def _flask_factory(ns: dict[str, Any]) -> list[str]:
    with ns["app"].test_client().get("/pricing") as response:
        assert response.status_code == 200
    with ns["app"].test_client().get("/healthz"):  # excluded by app.config, 404 and untracked
        pass
    return ["Viewed Pricing"]


def _asgi_get(app: Any, *requests: tuple[str, str]) -> None:
    async def drive() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app.example.com") as http:
            for method, path in requests:
                response = await http.request(method, path)
                assert response.status_code == 200, response.text

    asyncio.run(drive())


def _fastapi_signup(ns: dict[str, Any]) -> list[str]:
    from fastapi.testclient import TestClient

    with TestClient(ns["app"]) as http:
        assert http.post("/signup").json() == {"ok": "yes"}
        if "pricing" in ns:
            assert http.get("/pricing").status_code == 200
    return ["Signed Up", "Viewed Pricing"] if "pricing" in ns else ["Signed Up"]


def _starlette(ns: dict[str, Any]) -> list[str]:
    from starlette.testclient import TestClient

    with TestClient(ns["app"]) as http:
        assert http.get("/pricing").text == "..."
    return ["Viewed Pricing"]


def _litestar(ns: dict[str, Any]) -> list[str]:
    from litestar.testing import TestClient

    with TestClient(ns["app"]) as http:  # its exit runs on_shutdown: client.shutdown()
        assert http.get("/pricing").text == "..."
    assert ns["client"].stats.delivered == 1  # delivered by the snippet's shutdown hook
    return ["Viewed Pricing"]


def _quart(ns: dict[str, Any]) -> list[str]:
    async def drive() -> None:
        response = await ns["app"].test_client().get("/pricing")
        assert response.status_code == 200

    asyncio.run(drive())
    return ["Viewed Pricing"]


def _wsgi_get(app: Any, path: str = "/pricing", cookie: str | None = None) -> None:
    """One GET straight through the WSGI callable, as a server would call it (no test client
    in between: werkzeug's builds the Cookie header from its own jar)."""
    environ: dict[str, Any] = {"PATH_INFO": path, "HTTP_HOST": "www.example.com"}
    if cookie:
        environ["HTTP_COOKIE"] = cookie
    wsgiref.util.setup_testing_defaults(environ)
    status: list[str] = []
    body = app(environ, lambda s, headers, exc_info=None: status.append(s))
    try:
        b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()
    assert status and status[0].startswith("200"), status


def _falcon(ns: dict[str, Any]) -> list[str]:
    _wsgi_get(ns["app"])
    return ["Viewed Pricing"]


def _wsgi(ns: dict[str, Any]) -> list[str]:
    _wsgi_get(ns["application"], "/")
    return ["Viewed Pricing"]


def _asgi(ns: dict[str, Any]) -> list[str]:
    _asgi_get(ns["app"], ("GET", "/"))
    return ["Viewed Pricing"]


def _consent(ns: dict[str, Any]) -> list[str]:
    app = ns["app"]

    @app.get("/pricing")
    def pricing() -> str:
        from flask import request

        request.environ["koala.tracker"].track(
            "Viewed Pricing", {"consent": "yes" in request.headers.get("Cookie", "")}
        )
        return "..."

    _wsgi_get(app, cookie="consent=yes")
    _wsgi_get(app, cookie="consent=no")  # not tracked
    return ["Viewed Pricing"]  # once: asserted in the test below


def _django_settings(ns: dict[str, Any]) -> list[str]:
    assert "koala_middleware.django.KoalaMiddleware" in ns["MIDDLEWARE"]
    return []


def _django_views(ns: dict[str, Any]) -> list[str]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")
    import django

    django.setup()
    from django.test import Client, override_settings
    from django.urls import path

    settings_snippet = next(s for s in SNIPPETS if s.name == "django-settings")
    settings_ns: dict[str, Any] = {}
    exec(settings_snippet.code, settings_ns)
    urls = types.ModuleType("snippet_urls")
    urls.urlpatterns = [path("signup", ns["signup"]), path("pricing", ns["pricing"])]  # type: ignore[attr-defined]
    koala = dict(settings_ns["KOALA"])  # a new value: a new client, from KOALA_API_URL
    with override_settings(ROOT_URLCONF=urls, MIDDLEWARE=settings_ns["MIDDLEWARE"], KOALA=koala):
        http = Client()
        assert http.post("/signup", {"email": "ada@example.com", "name": "Ada"}).content == b"welcome"
        assert http.get("/pricing").content == b"..."
        assert http.get("/healthz").status_code == 404
    return ["Signed Up", "Viewed Pricing"]


CHECKS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "readme-flask": _flask_signup,
    "flask-signup": _flask_signup,
    "flask-factory": _flask_factory,
    "readme-fastapi": _fastapi_signup,
    "fastapi-signup": _fastapi_signup,
    "starlette-app": _starlette,
    "litestar-app": _litestar,
    "quart-app": _quart,
    "falcon-app": _falcon,
    "wsgi-app": _wsgi,
    "asgi-app": _asgi,
    "consent": _consent,
    "django-settings": _django_settings,
    "django-views": _django_views,
    "readme-outside": lambda ns: ["Invoice Paid"],
    "identity-outside": lambda ns: ["Invoice Paid"],
}


@pytest.mark.parametrize("snippet", RUNNABLE, ids=[s.id for s in RUNNABLE])
def test_snippet_runs(
    snippet: Snippet, koala_collector: Collector, koala_client: KoalaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOALA_PUBLIC_KEY", "pk_test")
    monkeypatch.setenv("KOALA_API_URL", koala_collector.url)
    monkeypatch.delenv("KOALA_SPOOL_DIR", raising=False)
    before = set(_live_clients)
    # A real module: frameworks resolve handlers' annotations through sys.modules (Litestar).
    module = types.ModuleType(f"snippet_{(snippet.name or str(snippet.line)).replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ns: dict[str, Any] = module.__dict__
    try:
        exec(compile(snippet.code, str(snippet.path), "exec"), ns)
        for name, value in list(ns.items()):
            if name.startswith("test_") and callable(value):
                value(koala_client=koala_client, koala_collector=koala_collector)
        expected = CHECKS[snippet.name](ns) if snippet.name in CHECKS else []
        for client in set(_live_clients) - before:
            assert client.flush(5)
    finally:
        for client in set(_live_clients) - before:
            client.shutdown()
    sent = [event["event"] for event in koala_collector.events()]
    for event in expected:
        assert event in sent, f"{snippet.id}: {event!r} did not reach the collector (got {sent})"
    if snippet.name == "consent":
        assert sent == ["Viewed Pricing"] and koala_collector.events()[0]["properties"] == {"consent": True}


def test_every_named_snippet_is_checked_or_a_fragment() -> None:
    """A name with no check is most likely a typo in the marker or in CHECKS."""
    unchecked = [
        s.id
        for s in RUNNABLE
        if s.name
        and s.name not in CHECKS
        and s.name not in ("collector", "collector-faults", "pytest-flask", "configuration-where")
    ]
    assert unchecked == []
    assert [s.id for s in SNIPPETS if s.fragment and s.name not in PREAMBLES] == []
    assert len(SNIPPETS) >= 25, [s.id for s in SNIPPETS]


@pytest.mark.skipif(
    sys.version_info < (3, 11),
    reason="type-checked on 3.11+: on 3.10 Falcon types its own App with a narrower StartResponse "
    "(falcon/_typing.py's fallback for wsgiref.types), which no WSGI middleware's signature accepts",
)
def test_every_snippet_type_checks(tmp_path: Path) -> None:
    """``mypy --strict`` on every block, a fragment after its preamble: the Flask example
    once failed four times (``"Request" has no attribute "koala"``)."""
    files = []
    for index, snippet in enumerate(SNIPPETS):
        path = tmp_path / f"snippet_{index:03d}.py"
        path.write_text((PREAMBLES[snippet.name] if snippet.fragment else "") + snippet.code)
        files.append((path, snippet))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            *(str(p) for p, _ in files),
        ],
        cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = done.stdout
    for path, snippet in files:
        report = report.replace(str(path), snippet.id)
    assert done.returncode == 0, report


def test_readme_is_short_and_keeps_the_quick_start() -> None:
    """The README is the PyPI page: under 200 lines, with the two commands CI runs."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    assert "python3 scripts/dev.py demo" in readme and "python3 scripts/dev.py test" in readme
    assert "python3 scripts/dev.py test" in (ROOT / ".ci" / "run").read_text()
    assert "KOALA_SKIP_CHROMIUM_INSTALL=1" in readme


def test_readme_links_resolve() -> None:
    """The README's relative links (to docs/, CONTRIBUTING.md, LICENSE) name files that
    exist; the site's own links are checked by ``mkdocs build --strict``."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\((?!https?://)([^)#]+)", readme)
    assert targets and [t for t in targets if not (ROOT / t).is_file()] == []


def test_the_check_transcript_is_what_the_command_prints(koala_collector: Collector) -> None:
    """docs/check.md shows a session of ``python -m koala_middleware check``: run it against
    the local collector, and each line must say the same thing (its URLs and key aside)."""
    text = (ROOT / "docs" / "check.md").read_text()
    block = re.search(r"<!-- snippet: check-transcript -->\n```console\n(.*?)```", text, re.S)
    assert block, "the transcript lost its marker"
    command, *shown = block[1].splitlines()
    assert command.startswith("$ python -m koala_middleware check")
    env = {**os.environ, "KOALA_PUBLIC_KEY": "pk_test", "KOALA_API_URL": koala_collector.url}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "koala_middleware", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    printed = done.stdout.splitlines()

    def general(line: str) -> str:
        line = line.replace(koala_collector.url, "https://api2.getkoala.com").replace("pk_test", "pk_...")
        return line.replace("(from KOALA_API_URL)", "(the default)")

    assert [general(line) for line in printed] == shown
