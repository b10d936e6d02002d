"""The server stop matrix: SIGTERM with a tracked request pending and Koala down at the
signal (back 0.5 s later). Every server the README lists delivers the batch.

How, cell by cell (the README's "Stopping and crashing" table): gunicorn, daphne and a
single hypercorn worker exit normally (``atexit``); uvicorn and granian ASGI flush at
lifespan shutdown; waitress and ``flask run`` leave SIGTERM at its default action, so the
client's SIGTERM handler flushes; uvicorn loads the app before it installs its own handler
and re-raises SIGTERM into it once it has shut down; hypercorn's and granian's
``multiprocessing`` workers flush in the handler or at ``multiprocessing``'s exit.
``NO_LIFESPAN`` puts the middleware where lifespan never reaches it (a Starlette ``Mount``,
a Litestar route): the same mechanisms, minus lifespan, still deliver, except under
uvicorn ``--workers 2`` (``LIMITS``, a documented limit): there the spool delivers the
batch after a restart.

All servers run at once against one collector, each told apart by the User-Agent of its
request, so the whole matrix costs about one server start and one shutdown.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.servers import BIN, ROOT, batches_from, free_port, wait_for_port
from koala_middleware.testing import Collector

WSGI = "tests.e2e.apps.faults_wsgi:app"
ASGI = "tests.e2e.apps.faults_asgi:app"
HOST = "127.0.0.1"

#: cell -> the command line, with {port} and {host}; the request path is /track unless said.
CELLS: dict[str, list[str]] = {
    "gunicorn-sync": ["gunicorn", "-w", "1", "-k", "sync", "-b", "{host}:{port}", WSGI],
    "gunicorn-gthread": ["gunicorn", "-w", "1", "-k", "gthread", "--threads", "4", "-b", "{host}:{port}", WSGI],
    "gunicorn-gevent": ["gunicorn", "-w", "1", "-k", "gevent", "-b", "{host}:{port}", WSGI],
    "uvicorn": ["uvicorn", "--host", "{host}", "--port", "{port}", "--no-access-log", ASGI],
    "uvicorn-workers-2": ["uvicorn", "--host", "{host}", "--port", "{port}", "--no-access-log", "--workers", "2", ASGI],
    "hypercorn": ["hypercorn", "-b", "{host}:{port}", ASGI],
    "hypercorn-workers-2": ["hypercorn", "-w", "2", "-b", "{host}:{port}", ASGI],
    "daphne": ["daphne", "-b", "{host}", "-p", "{port}", ASGI],
    "granian-asgi": ["granian", "--interface", "asgi", "--host", "{host}", "--port", "{port}", ASGI],
    "granian-wsgi": ["granian", "--interface", "wsgi", "--host", "{host}", "--port", "{port}", WSGI],
    "waitress": ["waitress-serve", "--listen={host}:{port}", WSGI],
    "flask-run": ["flask", "--app", "tests.e2e.apps.stop_flask:app", "run", "--host", "{host}", "--port", "{port}"],
}
MOUNTED = "tests.e2e.apps.stop_mounted:mounted"
LITESTAR = "tests.e2e.apps.stop_mounted:litestar"
#: The middleware where lifespan never reaches it: a Starlette ``Mount`` and a Litestar route.
NO_LIFESPAN: dict[str, list[str]] = {
    "uvicorn-mounted": ["uvicorn", "--host", "{host}", "--port", "{port}", "--no-access-log", MOUNTED],
    "hypercorn-mounted": ["hypercorn", "-b", "{host}:{port}", MOUNTED],
    "daphne-mounted": ["daphne", "-b", "{host}", "-p", "{port}", MOUNTED],
    "granian-mounted": ["granian", "--interface", "asgi", "--host", "{host}", "--port", "{port}", MOUNTED],
    "uvicorn-litestar": ["uvicorn", "--host", "{host}", "--port", "{port}", "--no-access-log", LITESTAR],
    "hypercorn-litestar": ["hypercorn", "-b", "{host}:{port}", LITESTAR],
}
#: The documented limits: uvicorn's workers load the app after installing their own SIGTERM
#: handler and die of the signal once they have shut down, so without lifespan nothing runs
#: in between. The spool covers them: the batch arrives after a restart.
LIMITS: dict[str, list[str]] = {
    "uvicorn-workers-2-mounted": [*CELLS["uvicorn-workers-2"][:-1], MOUNTED],
    "uvicorn-workers-2-litestar": [*CELLS["uvicorn-workers-2"][:-1], LITESTAR],
}


@dataclass
class Cell:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    path: str = "/track"
    output: str = field(default="", repr=False)

    @property
    def user_agent(self) -> str:
        return f"stop-matrix/{self.name}"


def popen(name: str, args: list[str], env: dict[str, str]) -> Cell:
    port = free_port()
    words = [a.format(host=HOST, port=port) for a in args]
    exe = str(BIN / words[0]) if (BIN / words[0]).exists() else words[0]
    proc = subprocess.Popen(
        [exe, *words[1:]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Cell(name, proc, port)


@contextmanager
def servers(cells: dict[str, list[str]], koala: Collector, **options: Any) -> Iterator[list[Cell]]:
    """Start every cell's server at once; on the way out, make sure none is left running."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "KOALA_API_URL": koala.url,
        "FAULTS_CLIENT": json.dumps(options),
    }
    started = [popen(name, args, env) for name, args in cells.items()]
    for cell in started:
        if cell.name.endswith("-mounted"):
            cell.path = "/sub/track"
    try:
        for cell in started:
            wait_for_port(cell.port, cell.proc, timeout=60)
        yield started
    finally:
        for cell in started:
            if cell.proc.poll() is None:
                os.killpg(cell.proc.pid, signal.SIGKILL)
            out, _ = cell.proc.communicate()
            cell.output += out.decode(errors="replace")


def track_one(cell: Cell) -> None:
    with httpx.Client(base_url=f"http://{HOST}:{cell.port}", timeout=10) as http:
        response = http.get(cell.path, params={"n": 1}, headers={"User-Agent": cell.user_agent})
    assert response.status_code == 200, (cell.name, response.text)


def stop_all(cells: list[Cell], koala: Collector, wait: float = 20.0) -> dict[str, int | None]:
    """SIGTERM every server (Koala down), bring Koala back 0.5 s later, wait for exits."""
    for cell in cells:
        cell.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    koala.up()
    deadline = time.monotonic() + wait
    for cell in cells:
        with contextlib.suppress(subprocess.TimeoutExpired):
            cell.proc.wait(max(deadline - time.monotonic(), 0.1))
    return {cell.name: cell.proc.poll() for cell in cells}


@dataclass
class Outcome:
    code: int | None
    delivered: int
    output: str


@pytest.fixture(scope="module")
def matrix() -> dict[str, Outcome]:
    """Every cell at once: one tracked request each with Koala down, SIGTERM, Koala back."""
    with Collector() as koala:
        with servers({**CELLS, **NO_LIFESPAN}, koala) as cells:
            koala.down()
            for cell in cells:
                track_one(cell)
            codes = stop_all(cells, koala)
        return {
            cell.name: Outcome(codes[cell.name], len(batches_from(koala, cell.user_agent)), cell.output)
            for cell in cells
        }


@pytest.mark.parametrize("cell", [*CELLS, *NO_LIFESPAN])
def test_sigterm_with_koala_down_delivers_the_pending_batch(matrix: dict[str, Outcome], cell: str) -> None:
    outcome = matrix[cell]
    assert outcome.code is not None, f"{cell} did not exit within 20 s:\n{outcome.output[-3000:]}"
    assert outcome.delivered == 1, f"{cell}: {outcome.delivered} batch(es) arrived\n{outcome.output[-3000:]}"


def test_the_limits_lose_nothing_with_a_spool_the_batch_arrives_after_a_restart(tmp_path: Path) -> None:
    spool = str(tmp_path)
    with Collector() as koala:
        with servers(LIMITS, koala, spool_dir=spool) as cells:
            koala.down()
            for cell in cells:
                track_one(cell)
            codes = stop_all(cells, koala)
        assert all(code is not None for code in codes.values()), codes
        restart = subprocess.run(
            [sys.executable, "-m", "tests.e2e.apps.spool_script", "deliver", "0"],
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "KOALA_API_URL": koala.url,
                "FAULTS_CLIENT": json.dumps({"spool_dir": spool, "handle_sigterm": False}),
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert restart.returncode == 0, restart.stderr
        delivered = {cell.name: len(batches_from(koala, cell.user_agent)) for cell in cells}
    assert delivered == dict.fromkeys(LIMITS, 1), (delivered, restart.stdout)
