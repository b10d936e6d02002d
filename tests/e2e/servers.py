"""Start real servers (uvicorn, gunicorn, ...) on loopback for end-to-end tests."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import gunicorn.config
import httpx

from koala_middleware.testing import Collector

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS and Windows start theirs at 49152


#: Ports for the servers the tests start come from below the kernel's ephemeral range: a
#: port that ``bind(0)`` hands out is one that any outgoing connection (a sender's, a test
#: client's) may take as its own local port before the server binds it, and the stop
#: matrix, which starts 20 servers while others connect, once failed so ("Address already
#: in use"). Below that range only a listener can hold a port.
_PORTS = range(20000, max(_ephemeral_start(), 20001))
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port no server of this run was given and nothing listens on now."""
    for _ in range(200):
        port = random.choice(_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:  # a crowded range: the kernel's pick, as before
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode} before listening:\n{out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port} within {timeout}s")


def script_process(module: str, *args: str, env: Mapping[str, str]) -> subprocess.Popen[str]:
    """``python -m module args`` from the repository root, the package importable, ``env``
    added to this process's environment; stdout and stderr piped, as text."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.output = ""

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait for exit, keep the output; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.output += out.decode(errors="replace") if out else ""
        return self.proc.returncode

    def stop_cleanly(self) -> None:
        """SIGTERM; the server must exit as servers do on SIGTERM, within 15 s.

        uvicorn ends its process by re-raising the signal once it has shut down (exit status
        -SIGTERM), and no interpreter exit hook runs after that; gunicorn exits with 0.
        """
        stopping = time.monotonic()
        assert self.terminate() in (0, -signal.SIGTERM), self.output[-3000:]
        assert time.monotonic() - stopping < 15, self.output[-3000:]


@contextmanager
def serve(args: list[str], port: int, env: Mapping[str, str] | None = None) -> Iterator[Server]:
    """Run ``args`` (e.g. ``["uvicorn", "mod:app", "--port", str(port)]``) until the block ends.

    The first word is looked up next to the running Python (the venv's ``bin``).
    """
    exe = str(BIN / args[0]) if (BIN / args[0]).exists() else args[0]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **(env or {})}
    proc = subprocess.Popen([exe, *args[1:]], cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = Server(proc, port)
    try:
        wait_for_port(port, proc)
        yield server
    finally:
        server.terminate()


# Recent gunicorn opens a control socket at one fixed path per user: concurrent runs would share it.
NO_CONTROL_SOCKET = [cli for s in gunicorn.config.KNOWN_SETTINGS if s.name == "control_socket_disable" for cli in s.cli]


def run_gunicorn(koala: Collector, app: str, *options: str) -> AbstractContextManager[Server]:
    """gunicorn with ``--preload``, 2 workers of 4 threads (unless ``options`` say otherwise)."""
    port = free_port()
    args = [
        "gunicorn",
        "--preload",
        "-w",
        "2",
        "--threads",
        "4",
        "-b",
        f"127.0.0.1:{port}",
        *NO_CONTROL_SOCKET,
        *options,
        app,
    ]
    return serve(args, port, env=collector_env(koala))


def run_uvicorn(koala: Collector, app: str, *options: str) -> AbstractContextManager[Server]:
    port = free_port()
    args = ["uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--no-access-log", *options]
    return serve(args, port, env=collector_env(koala))


def collector_env(koala: Collector) -> dict[str, str]:
    """The environment that points a served app's ``KoalaClient()`` at ``koala``."""
    return {"KOALA_API_URL": koala.url, "KOALA_PUBLIC_KEY": "pk_test"}


def batches_from(koala: Collector, ua: str, path: str = "/batch") -> list[dict[str, Any]]:
    """Accepted batch bodies sent with User-Agent ``ua`` (each test uses its own UA)."""
    return [r.json() for r in koala.requests(path) if r.headers.get("user-agent") == ua]


def user_agent() -> str:
    """A User-Agent of a test's own: tests sharing a server find their batches by it."""
    return f"Mozilla/5.0 (e2e {uuid.uuid4().hex[:8]})"


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def ko_id_cookie(response: httpx.Response) -> str | None:
    """The response's one ``ko_id`` Set-Cookie, or None (two would be a bug)."""
    cookies = [c for c in response.headers.get_list("set-cookie") if c.startswith("ko_id=")]
    assert len(cookies) <= 1
    return cookies[0] if cookies else None


def fault_server(kind: str, koala: Collector, **client_options: Any) -> AbstractContextManager[Server]:
    """uvicorn or gunicorn (gthread) serving the fault apps, their client options given as JSON."""
    port = free_port()
    env = {"KOALA_API_URL": koala.url, "FAULTS_CLIENT": json.dumps(client_options)}
    if kind == "uvicorn":
        args = [
            "uvicorn",
            "tests.e2e.apps.faults_asgi:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",  # its output is read only at exit: keep it well under a pipe's buffer
        ]
    else:
        args = [
            "gunicorn",
            "-b",
            f"127.0.0.1:{port}",
            "-w",
            "1",
            "-k",
            "gthread",
            "--threads",
            "4",
            "tests.e2e.apps.faults_wsgi:app",
        ]
    return serve(args, port, env=env)
