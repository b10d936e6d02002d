"""Part 7: the first-party pixel (``pixel_path``).

(a) What it costs the requests it does not proxy: the part 1 harness (in process, no
server), returning visitors, each app with ``pixel_path`` unset, set, and an identical copy of
the unset one as a noise control; process CPU per request, variants interleaved in short
chunks, ratio = median over rounds of (variant / unset) in the same round.

(b) What a proxied request costs in latency: uvicorn (1 worker) serving a Starlette app with
``KoalaASGIMiddleware(pixel_path="/_k")``, then gunicorn (1 worker, gthread, 4 threads) serving
a WSGI app with ``KoalaWSGIMiddleware(pixel_path="/_k")``, in front of a stand-in upstream
(uvicorn, its own process); one client (this process) asks, in turn, the stand-in directly and through the
proxy: ``sdk.js`` cached (the upstream says ``max-age``), ``sdk.js`` uncached (``no-store``),
and an API POST. Ratio = median latency through the proxy / direct, same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

from .common import Row, check, median, say

SDK = b"/* stand-in sdk.js */ window.ko = window.ko || [];\n" * 600  # ~30 KB, as the real one's order
KEY = "pk_bench"


# -- the stand-in upstream and the proxying app (run under uvicorn, each its own process) --------


async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    path = scope["path"]
    if path.endswith("sdk.js"):
        cache = b"public, max-age=300" if "/nocache/" not in path else b"no-store"
        headers = [(b"content-type", b"application/javascript"), (b"cache-control", cache)]
        body = SDK
    else:
        headers = [(b"content-type", b"application/json")]
        body = b'{"ok":true}'
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def proxying_app() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from koala_middleware import KoalaClient
    from koala_middleware.asgi import KoalaASGIMiddleware

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    url = os.environ["BENCH_PIXEL_UPSTREAM"]
    return KoalaASGIMiddleware(
        Starlette(routes=[Route("/", home)]),
        KoalaClient(dry_run=True),
        pixel_path="/_k",
        pixel_api_url=url,
        pixel_cdn_url=url,
    )


def wsgi_proxying_app() -> Any:
    """The same under gunicorn: a bare WSGI app in ``KoalaWSGIMiddleware``."""
    from koala_middleware import KoalaClient
    from koala_middleware.wsgi import KoalaWSGIMiddleware

    def home(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    url = os.environ["BENCH_PIXEL_UPSTREAM"]
    return KoalaWSGIMiddleware(home, KoalaClient(dry_run=True), pixel_path="/_k", pixel_api_url=url, pixel_cdn_url=url)


# -- (a) cost on requests that are not proxied ----------------------------------------------------


def _overhead_rows(quick: bool) -> list[Row]:
    from koala_middleware import KoalaClient, current_tracker
    from koala_middleware.asgi import KoalaASGIMiddleware
    from koala_middleware.wsgi import KoalaWSGIMiddleware

    from .inproc import (
        VISITOR_ID,
        ParkedKoala,
        asgi_runner,
        asgi_scope,
        flask_app,
        starlette_app,
        wsgi_environ,
        wsgi_runner,
    )

    cookie = f"ko_id={VISITOR_ID}; ko_id_server={VISITOR_ID}"
    koala = ParkedKoala()  # part 1's: a Koala that never answers (nothing is recorded here anyway)
    client = KoalaClient("pk_bench", api_url=koala.url, timeout=3600.0, max_in_flight=1)
    loop = asyncio.new_event_loop()
    rows: list[Row] = []
    chunk = 300 if quick else 1000
    rounds = 9 if quick else 31
    # One app per framework, shared by the variants: separate app objects differ by a percent
    # or two on their own (measured), which would swamp a prefix check.
    flask_wsgi = flask_app(current_tracker).wsgi_app
    starlette = starlette_app(current_tracker)

    def flask_variant(**options: Any) -> Any:
        return wsgi_runner(KoalaWSGIMiddleware(flask_wsgi, client, **options), wsgi_environ("/", cookie))

    def starlette_variant(**options: Any) -> Any:
        return asgi_runner(KoalaASGIMiddleware(starlette, client, **options), asgi_scope("/", cookie), loop)

    for name, make in (("Flask (WSGI)", flask_variant), ("Starlette (ASGI)", starlette_variant)):
        variants = {"unset": make(), "set": make(pixel_path="/_k"), "unset copy": make()}
        for run in variants.values():
            run(chunk)  # warm up
        per: dict[str, list[float]] = {v: [] for v in variants}
        ratios: dict[str, list[float]] = {"set": [], "unset copy": []}
        order = list(variants)
        for round_number in range(rounds):
            took = {}
            rotated = order[round_number % 3 :] + order[: round_number % 3]
            for variant in rotated:
                started = time.process_time_ns()
                variants[variant](chunk)
                took[variant] = (time.process_time_ns() - started) / chunk
                per[variant].append(took[variant])
            for variant in ratios:
                ratios[variant].append(took[variant] / took["unset"])
        set_ratio = median(ratios["set"])
        noise = median(ratios["unset copy"])
        rows.append(
            Row(
                "7",
                f"not proxied, {name}: pixel_path set vs unset",
                f"{median(per['set']) / 1000:.1f} us CPU/request ({median(per['unset']) / 1000:.1f} unset)",
                set_ratio,
                "<= 1.02x",
                check(set_ratio, 1.02),
            )
        )
        rows.append(
            Row(
                "7",
                f"not proxied, {name}: noise control (unset vs unset)",
                "",
                noise,
                "0.95-1.05x",
                0.95 <= noise <= 1.05,
            )
        )
        say(f"part 7 {name}: set {set_ratio:.3f}x, control {noise:.3f}x")
    loop.close()
    client.shutdown(timeout=0)
    koala.close()
    return rows


# -- (b) latency through the proxy ----------------------------------------------------------------


@contextlib.contextmanager
def serve(target: list[str], port: int, env: dict[str, str], server: str = "uvicorn") -> Iterator[None]:
    """``uvicorn <target>`` (or gunicorn: 1 worker, gthread, 4 threads, as part 2) on ``port``
    in its own process, until the block ends."""
    from .collector import ROOT

    if server == "uvicorn":
        command = [sys.executable, "-m", "uvicorn", *target, "--host", "127.0.0.1", "--port", str(port)]
        command += ["--no-access-log", "--log-level", "warning", "--lifespan", "off"]
    else:
        command = [sys.executable, "-m", "gunicorn", "--workers", "1", "--worker-class", "gthread"]
        command += ["--threads", "4", "--bind", f"127.0.0.1:{port}", "--log-level", "warning", *target]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn {target} did not start")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _latency_rows(quick: bool) -> list[Row]:
    return _latency(quick, "uvicorn", ["bench.pixel:proxying_app", "--factory"]) + _latency(
        quick, "gunicorn", ["bench.pixel:wsgi_proxying_app()"]
    )


def _latency(quick: bool, server: str, target: list[str]) -> list[Row]:
    from .servers import free_port

    requests = 150 if quick else 600
    upstream_port, app_port = free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    rows: list[Row] = []
    with (
        serve(["bench.pixel:upstream"], upstream_port, {}),
        serve(target, app_port, {"BENCH_PIXEL_UPSTREAM": upstream_url}, server),
        httpx.Client(timeout=10) as http,
    ):
        app_url = f"http://127.0.0.1:{app_port}/_k"
        cases = [
            ("sdk.js, cached", "GET", f"/v1/{KEY}/sdk.js", None),
            ("sdk.js, uncached", "GET", f"/v1/nocache/{KEY}/sdk.js", None),
            ("API POST", "POST", f"/web/projects/{KEY}/batch", b'{"profile_id":"x","page_views":[{}]}'),
        ]
        for case, method, path, body in cases:
            times: dict[str, list[float]] = {"direct": [], "proxied": []}
            for base in (upstream_url, app_url):  # warm both
                for _ in range(20):
                    http.request(method, base + path, content=body).read()
            for index in range(requests):
                for label, base in (("direct", upstream_url), ("proxied", app_url))[:: 1 if index % 2 else -1]:
                    started = time.perf_counter()
                    response = http.request(method, base + path, content=body)
                    response.read()
                    times[label].append(time.perf_counter() - started)
                    assert response.status_code == 200, (label, response.status_code)
            direct, proxied = statistics.median(times["direct"]), statistics.median(times["proxied"])
            p99 = sorted(times["proxied"])[int(len(times["proxied"]) * 0.99) - 1]
            rows.append(
                Row(
                    "7",
                    f"through the proxy ({server}): {case}",
                    f"p50 {proxied * 1000:.2f} ms vs {direct * 1000:.2f} ms direct; p99 {p99 * 1000:.2f} ms",
                    proxied / direct,
                    "",
                    None,
                )
            )
            say(f"part 7 {server} {case}: {proxied * 1000:.2f} ms vs {direct * 1000:.2f} ms direct")
    return rows


def run(quick: bool) -> list[Row]:
    return _overhead_rows(quick) + _latency_rows(quick)


if __name__ == "__main__":
    from .common import markdown

    print(markdown(run("--quick" in sys.argv)))
