"""Parts 2 and 3: real servers on loopback, driven by ``bench.loadgen`` in another process.

Part 2 runs the same app bare and with the middleware side by side (uvicorn; gunicorn with
threads) and loads them in turn, round after round: requests/s and p50/p99 latency, and
their ratio per round; the median ratio is reported.

Part 3 (isolation) runs two servers with the middleware, one sending to a collector that
answers at once, one to a collector that takes 1 s per batch; every request records an
identify and an event. The p99 of responses should not notice the slow Koala.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .collector import ROOT, CollectorProcess
from .common import Row, check, median, say

RETURNING_COOKIE = (  # ko_id and its server-kept copy: a returning visitor gets no Set-Cookie
    "ko_id=0f8fad5b-d9cb-4980-b0f2-4b2a1c6f5d3e; ko_id_server=0f8fad5b-d9cb-4980-b0f2-4b2a1c6f5d3e; "
    "_ga=GA1.2.1234567890.1700000000"
)
CONNECTIONS = 8
GUNICORN_THREADS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(stack: str, port: int) -> list[str]:
    if stack == "uvicorn":
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.apps:asgi_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
    if stack == "gunicorn":
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            str(GUNICORN_THREADS),
            "--bind",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "bench.apps:wsgi_app",
        ]
    raise ValueError(stack)


@dataclasses.dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def servers(specs: dict[str, tuple[str, bool, str]]) -> Iterator[dict[str, Server]]:
    """Start ``{name: (stack, with_middleware, api_url)}``, all at once; stop them after."""
    started: dict[str, Server] = {}
    logs = Path(tempfile.mkdtemp(prefix="koala-bench-"))
    try:
        for name, (stack, middleware, api_url) in specs.items():
            port = free_port()
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "KOALA_BENCH_MIDDLEWARE": "1" if middleware else "0",
                "KOALA_BENCH_API_URL": api_url,
            }
            log = logs / f"{name.replace(' ', '_').replace(',', '')}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    server_command(stack, port), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            started[name] = Server(name, port, proc, log)
        for server in started.values():
            wait_for_port(server.port, server.proc, server.name, log=server.log)
        yield started
    finally:
        for server in started.values():
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in started.values():
            try:
                server.proc.wait(20)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 30.0, log: Path | None = None
) -> None:
    """Return once ``proc`` listens on ``port``; raise if it exits first (with its ``log``) or
    does not listen within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = f":\n{log.read_text(errors='replace')}" if log is not None else ""
            raise RuntimeError(f"{name} exited before listening{output}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen within {timeout} s")


def load(server: Server, path: str, seconds: float, cookie: str = RETURNING_COOKIE) -> dict[str, float]:
    """Run the load generator in its own process against ``server``."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--port",
            str(server.port),
            "--path",
            path,
            "--cookie",
            cookie,
            "--connections",
            str(CONNECTIONS),
            "--seconds",
            str(seconds),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout)
    if not result["requests"] or result["errors"]:
        raise RuntimeError(f"{server.name}: {result} (server log: {server.log})")
    return result


def interleave(group: dict[str, Server], path: str, rounds: int, seconds: float) -> dict[str, list[dict[str, float]]]:
    """Load each server of ``group`` in turn, ``rounds`` times, rotating who goes first."""
    names = list(group)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(load(group[name], path, seconds))
    return results


def _ratios(results: dict[str, list[dict[str, float]]], num: str, den: str, key: str) -> float:
    return median([a[key] / b[key] for a, b in zip(results[num], results[den], strict=True)])


def _latency(results: list[dict[str, float]]) -> str:
    rps = median([r["rps"] for r in results])
    p50 = median([r["p50_ms"] for r in results])
    p99 = median([r["p99_ms"] for r in results])
    return f"{rps:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms"


def run_throughput(quick: bool = False) -> list[Row]:
    # Six rounds: the median of four moved by about +-0.02 from run to run on a shared
    # 2-core machine, as much as the middleware's whole cost here.
    rounds, seconds = (2, 1.0) if quick else (6, 2.0)
    rows: list[Row] = []
    with CollectorProcess(delay=0.0) as koala:
        for stack in ("uvicorn", "gunicorn"):
            label = f"{stack} (1 worker, {GUNICORN_THREADS} threads)" if stack == "gunicorn" else f"{stack} (1 worker)"
            specs = {"bare": (stack, False, koala.url), "koala": (stack, True, koala.url)}
            with servers(specs) as group:
                say(f"servers: {label}, returning visitor ({rounds} rounds of {seconds:g} s each)")
                result = interleave(group, "/", rounds, seconds)
                ratio = _ratios(result, "koala", "bare", "rps")
                rows.append(Row("2", f"{label}, returning visitor: bare", _latency(result["bare"]), 1.0, "", None))
                rows.append(
                    Row(
                        "2",
                        f"{label}, returning visitor: koala",
                        _latency(result["koala"]),
                        ratio,
                        ">= 0.95x req/s",
                        check(ratio, 0.95, at_most=False),
                    )
                )
                if not quick:
                    say(f"servers: {label}, identify + track ({rounds} rounds)")
                    result = interleave(group, "/track", rounds, seconds)
                    ratio = _ratios(result, "koala", "bare", "rps")
                    rows.append(
                        Row(
                            "2",
                            f"{label}, identify + track, sent to a local collector: bare",
                            _latency(result["bare"]),
                            1.0,
                            "",
                            None,
                        )
                    )
                    rows.append(
                        Row(
                            "2",
                            f"{label}, identify + track, sent to a local collector: koala",
                            _latency(result["koala"]),
                            ratio,
                            "(information)",
                            None,
                        )
                    )
    return rows


def run_isolation(quick: bool = False) -> list[Row]:
    rounds, seconds = (2, 1.0) if quick else (4, 2.0)
    rows: list[Row] = []
    with CollectorProcess(delay=0.0) as fast, CollectorProcess(delay=1.0) as slow:
        for stack in ("uvicorn", "gunicorn"):
            specs = {"fast": (stack, True, fast.url), "slow": (stack, True, slow.url)}
            with servers(specs) as group:
                say(f"isolation: {stack}, collector at 0 ms vs 1 s ({rounds} rounds of {seconds:g} s each)")
                result = interleave(group, "/track", rounds, seconds)
                ratio = _ratios(result, "slow", "fast", "p99_ms")
                rows.append(
                    Row(
                        "3",
                        f"{stack}, identify + track, Koala answers in 0 ms",
                        _latency(result["fast"]),
                        1.0,
                        "",
                        None,
                    )
                )
                rows.append(
                    Row(
                        "3",
                        f"{stack}, identify + track, Koala answers in 1 s",
                        _latency(result["slow"]),
                        ratio,
                        "<= 1.10x p99",
                        check(ratio, 1.10),
                    )
                )
    return rows
