"""Shutdown with batches pending: SIGTERM to gunicorn and uvicorn, and plain interpreter exit.

A slow Koala: what was handed over before the signal arrives before the process exits. A
Koala that never answers: the process still exits, within ``shutdown_timeout`` plus the
server's own shutdown.

gunicorn workers exit normally, so the client's ``atexit`` hook flushes. uvicorn re-raises
SIGTERM once it has shut down (the process dies of it: no ``atexit``), so there the flush
is the middleware's, at lifespan shutdown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from typing import Any

import httpx
import pytest

from e2e.servers import ROOT, Server, free_port, serve
from koala_middleware._delivery._worker import LOG_SHUTDOWN_LOST
from koala_middleware.testing import Collector

SERVERS = {
    "gunicorn": ["gunicorn", "-w", "1", "tests.e2e.apps.faults_wsgi:app", "-b"],
    "uvicorn": ["uvicorn", "tests.e2e.apps.faults_asgi:app", "--no-access-log", "--host", "127.0.0.1", "--port"],
}
LOST_LINE = LOG_SHUTDOWN_LOST.split("%d")[0]
STOPPED = {"gunicorn": (0,), "uvicorn": (0, -signal.SIGTERM)}


def start(kind: str, koala: Collector, **options: Any) -> AbstractContextManager[Server]:
    port = free_port()
    address = f"127.0.0.1:{port}" if kind == "gunicorn" else str(port)
    env = {"KOALA_API_URL": koala.url, "FAULTS_CLIENT": json.dumps(options)}
    return serve([*SERVERS[kind], address], port, env=env)


def track_requests(server: Server, count: int) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for n in range(count):
            assert http.get("/track", params={"n": n}).status_code == 200


@pytest.mark.parametrize("kind", SERVERS)
def test_sigterm_delivers_pending_batches_before_exit(kind: str) -> None:
    with Collector(delay=1.0) as koala:
        with start(kind, koala, shutdown_timeout=5) as server:
            track_requests(server, 20)
            assert len(koala.requests()) < 20, "precondition: batches are still pending at SIGTERM"
            started = time.monotonic()
            assert server.terminate() in STOPPED[kind], server.output
            took = time.monotonic() - started
        ids = koala.message_ids()
        numbers = sorted(e["properties"]["n"] for e in koala.events())
    assert numbers == list(range(20)) and len(ids) == len(set(ids)) == 20, server.output
    assert took < 10, f"{kind} took {took:.1f}s to exit"
    assert LOST_LINE not in server.output


@pytest.mark.parametrize("kind", SERVERS)
def test_sigterm_with_a_koala_that_never_answers_exits_within_shutdown_timeout(kind: str) -> None:
    with Collector() as koala:
        koala.hang()
        with start(kind, koala, shutdown_timeout=1, timeout=30) as server:
            track_requests(server, 10)
            assert koala.wait_for(10, accepted_only=False), "precondition: all 10 are in flight"
            started = time.monotonic()
            assert server.terminate() in STOPPED[kind], server.output
            took = time.monotonic() - started
    # 1 s of waiting for Koala (gunicorn: the worker's exit hook; uvicorn: the lifespan
    # flush), plus the server's own shutdown.
    assert took < 3.0, f"{kind} took {took:.1f}s to exit with shutdown_timeout=1"
    if kind == "gunicorn":
        assert f"{LOST_LINE}10 batch(es)" in server.output, server.output


def run_exit_script(koala: Collector, count: int, **options: Any) -> tuple[dict[str, Any], dict[str, Any], float]:
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "tests.e2e.apps.faults_exit", str(count)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "KOALA_API_URL": koala.url, "FAULTS_CLIENT": json.dumps(options)},
        timeout=60,
        check=False,
    )
    ended = time.time()
    assert done.returncode == 0, done.stderr
    handed_over, exited = (json.loads(line) for line in done.stdout.splitlines())
    assert started < handed_over["handed_over_at"] < exited["exited_at"] < ended
    return handed_over, exited, ended - handed_over["handed_over_at"]


def test_interpreter_exit_flushes_pending_batches() -> None:
    with Collector(delay=0.5) as koala:
        _, exited, _ = run_exit_script(koala, 30, shutdown_timeout=5)
        assert len(set(koala.message_ids())) == 30
    assert exited["stats"]["delivered"] == 30 and exited["stats"]["queued"] == 0


def test_interpreter_exit_with_a_koala_that_never_answers_takes_shutdown_timeout_at_most() -> None:
    with Collector() as koala:
        koala.hang()
        handed_over, exited, took = run_exit_script(koala, 30, shutdown_timeout=1, timeout=30)
    assert exited["exited_at"] - handed_over["handed_over_at"] < 1.3
    assert took < 2.5, f"exit took {took:.1f}s after the hand-over with shutdown_timeout=1"
    stats = exited["stats"]
    assert stats["dropped"] == {"shutdown": 30} and stats["queued"] == 0 and stats["delivered"] == 0
