"""The Django test project (tests/django_project) served by gunicorn (WSGI) and uvicorn (ASGI,
through ``koala_middleware.django.get_asgi_application``), both at once against one slow
collector: the cookie on the wire, Django's 400 for a disallowed host, a streamed body, and
SIGTERM delivering the batches still pending."""

from __future__ import annotations

import json
import re
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx

from e2e.servers import Server, free_port, ko_id_cookie, serve
from koala_middleware.testing import Collector

STOPPED = (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once it has shut down
REQUESTS = 5


def start(kind: str, koala: Collector, stack: ExitStack) -> Server:
    port = free_port()
    args = {
        "gunicorn": [
            "gunicorn",
            "-w",
            "1",
            "--threads",
            "2",
            "django_project.wsgi:application",
            "-b",
            f"127.0.0.1:{port}",
        ],
        "uvicorn": ["uvicorn", "django_project.asgi:application", "--no-access-log", "--port", str(port)],
    }[kind]
    env = {
        "DJANGO_SETTINGS_MODULE": "django_project.settings",
        "KOALA_API_URL": koala.url,
        "KOALA_PUBLIC_KEY": "pk_test",
        # One batch in flight at a time against a slow Koala: most are still queued at SIGTERM
        # (the collector counts a request it answers even if the sender is gone by then).
        "KOALA_DJANGO_OPTIONS": json.dumps({"shutdown_timeout": 5, "max_in_flight": 1, "exclude_paths": ["/healthz"]}),
    }
    return stack.enter_context(serve(args, port, env=env))


def exercise(server: Server, ua: str) -> None:
    with httpx.Client(base_url=server.url, timeout=10, headers={"User-Agent": ua}) as http:
        first = http.get("/track", params={"n": 0}, headers={"Host": "app.example.com"})
        cookie = ko_id_cookie(first)
        assert first.status_code == 200 and cookie is not None, server.output
        attributes = set(cookie.split("; ")[1:])
        assert attributes == {"Domain=example.com", "Path=/", "Max-Age=31536000", "SameSite=Lax"}, cookie
        assert cookie.startswith(f"ko_id={first.json()['ko_id']};")
        http.cookies.set("ko_id", first.json()["ko_id"])
        for n in range(1, REQUESTS):  # a returning visitor: no Set-Cookie
            again = http.get("/track", params={"n": n}, headers={"Host": "app.example.com"})
            assert again.status_code == 200 and ko_id_cookie(again) is None
        bad_host = httpx.get(f"{server.url}/track", headers={"Host": "evil.test"})  # a new visitor
        assert bad_host.status_code == 400 and ko_id_cookie(bad_host) is None
        with http.stream("GET", "/stream") as streamed:
            assert list(streamed.iter_lines()) == ["chunk 0", "chunk 1", "chunk 2"]


def test_django_under_gunicorn_and_uvicorn_delivers_pending_batches_at_sigterm() -> None:
    with Collector(delay=0.3) as koala, ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        servers = {kind: start(kind, koala, stack) for kind in ("gunicorn", "uvicorn")}
        for done in [pool.submit(exercise, server, f"ua-{kind}") for kind, server in servers.items()]:
            done.result(30)  # both served at once; a failed assertion is raised here
        assert len(koala.requests()) < 2 * (REQUESTS + 1), "precondition: batches are pending at SIGTERM"
        codes = dict(zip(servers, pool.map(lambda server: server.terminate(), servers.values()), strict=True))
        for kind, server in servers.items():
            assert codes[kind] in STOPPED, f"{kind}: {codes[kind]}\n{server.output}"
            sent = [
                e
                for r in koala.requests("/batch")
                if r.headers["user-agent"] == f"ua-{kind}"
                for e in r.json()["events"]
            ]
            numbers = sorted(e["properties"]["n"] for e in sent if e["event"] == "Sync View")
            assert numbers == list(range(REQUESTS)), f"{kind}: {numbers}\n{server.output}"
            assert len([e for e in sent if e["event"] == "Streamed Chunk"]) == 3, server.output


def test_the_django_example_serves_and_records_a_sign_up() -> None:
    port = free_port()
    env = {"PORT": str(port), "KOALA_PUBLIC_KEY": "", "KOALA_API_URL": ""}
    with (
        serve([sys.executable, "examples/django_app/app.py"], port, env=env) as server,
        httpx.Client(base_url=server.url, timeout=10) as http,
    ):
        home = http.get("/")
        assert home.status_code == 200 and f"<code>{http.cookies['ko_id']}</code>" in home.text
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', home.text)
        assert token is not None
        form = {"name": "Ada", "email": "ada@acme-robotics.com", "csrfmiddlewaretoken": token[1]}
        assert http.post("/signup", data=form).status_code == 302
        page = http.get("/").text
        assert "Signed in as <b>Ada</b>" in page and "&quot;event&quot;: &quot;Signed Up&quot;" in page
