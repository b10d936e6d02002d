"""gunicorn's gevent worker, with and without ``--preload``, while Koala is slow or down.

Under ``--preload`` the client (and this library) is imported in the master, before the
worker monkey-patches; the sender used to become a greenlet blocking in a real ``select()``,
so every request of the worker waited for Koala (2 s), or for the backoff while Koala was
down. Now it runs on a native thread (see ``koala_middleware/_delivery/_native.py``).

One gunicorn per mode, one collector for the module; each test changes the collector's
state, measures 100 requests from 5 kept-alive clients, puts it back and waits for the
events. The app posts to ``localhost`` rather than an IP, so the sender resolves a host
name from its own thread as in production.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from e2e.servers import (
    NO_CONTROL_SOCKET,
    Server,
    batches_from,
    collector_env,
    free_port,
    script_process,
    serve,
    wait_until,
)
from koala_middleware.testing import Collector

pytest.importorskip("gevent")

APP = "tests.e2e.apps.gevent_app:app"
CLIENTS, REQUESTS_EACH = 5, 20  # 100 requests: p99 is the second slowest
P99_LIMIT = 0.1  # seconds, for an app that does nothing


@pytest.fixture(scope="module", params=["preload", "no-preload"])
def server(request: pytest.FixtureRequest, koala: Collector) -> Iterator[Server]:
    port = free_port()
    preload = ["--preload"] if request.param == "preload" else []
    args = [
        "gunicorn",
        "-k",
        "gevent",
        *preload,
        "-w",
        "1",
        "--graceful-timeout",
        "5",
        "-b",
        f"127.0.0.1:{port}",
        *NO_CONTROL_SOCKET,
        APP,
    ]
    env = {**collector_env(koala), "KOALA_API_URL": f"http://localhost:{koala.port}"}
    with serve(args, port, env=env) as running:
        yield running
        running.stop_cleanly()  # the worker exits on SIGTERM, its sender flushed


def get(connection: http.client.HTTPConnection, path: str, ua: str) -> tuple[int, bytes, float]:
    started = time.perf_counter()
    connection.request("GET", path, headers={"User-Agent": ua})
    response = connection.getresponse()
    body = response.read()
    return response.status, body, time.perf_counter() - started


def load(server: Server, ua: str) -> list[float]:
    """CLIENTS kept-alive connections, REQUESTS_EACH requests each; the sorted durations."""
    durations: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def visitor() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            for _ in range(REQUESTS_EACH):
                status, body, elapsed = get(connection, "/", ua)
                with lock:
                    durations.append(elapsed)
                    if status != 200 or body != b"ok":
                        failures.append(f"{status} {body[:100]!r}")
        finally:
            connection.close()

    threads = [threading.Thread(target=visitor) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    assert len(durations) == CLIENTS * REQUESTS_EACH
    return sorted(durations)


def p99(durations: list[float]) -> float:
    """Nearest rank, of sorted durations."""
    return durations[max(0, round(len(durations) * 0.99) - 1)]


def warm_up(server: Server, koala: Collector) -> None:
    """A first tracked request, delivered: imports done, the worker's sender thread running."""
    ua = f"warm-up {uuid.uuid4().hex[:8]}"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        assert get(connection, "/", ua)[0] == 200
    finally:
        connection.close()
    assert wait_until(lambda: len(batches_from(koala, ua)) == 1), server.proc.poll()


@pytest.mark.parametrize("koala_state", ["slow", "down"])
def test_responses_stay_fast_and_events_arrive_once_koala_answers(
    server: Server, koala: Collector, koala_state: str
) -> None:
    warm_up(server, koala)
    ua = f"gevent-e2e {koala_state} {uuid.uuid4().hex[:8]}"
    if koala_state == "slow":
        koala.slow(2.0)
    else:
        koala.down()
    try:
        durations = load(server, ua)
        assert batches_from(koala, ua) == []  # nothing answered yet: the responses did not wait for Koala
    finally:
        koala.slow(0)
        if koala_state == "down":
            koala.up()
    print(
        f"{koala_state}: p50 {durations[len(durations) // 2] * 1000:.1f} ms, p99 {p99(durations) * 1000:.1f} ms, "
        f"max {durations[-1] * 1000:.1f} ms"
    )
    assert p99(durations) < P99_LIMIT, [round(d, 3) for d in durations[-5:]]
    sent = CLIENTS * REQUESTS_EACH
    assert wait_until(lambda: len(batches_from(koala, ua)) == sent, timeout=20), (len(batches_from(koala, ua)), sent)
    assert all(b["events"][0]["event"] == "Pinged" for b in batches_from(koala, ua))


def test_the_senders_event_loop_is_not_the_workers(server: Server, koala: Collector) -> None:
    """A handler's ``asyncio.run()`` works while the sender's loop runs (it failed under gevent)."""
    warm_up(server, koala)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        status, body, _ = get(connection, "/asyncio", "gevent-e2e asyncio")
    finally:
        connection.close()
    assert (status, body) == (200, b"asyncio ok")


# -- plain patch_all() processes (no gunicorn): 20 runs each, in parallel, none may hang ----

RUNS = 20
GEVENT_SCRIPT = "tests.e2e.apps.gevent_script"


def gevent_script(mode: str, koala: Collector) -> subprocess.Popen[str]:
    return script_process(GEVENT_SCRIPT, mode, env={"KOALA_API_URL": koala.url})


def outcome(proc: subprocess.Popen[str], timeout: float) -> tuple[int | None, str, str]:
    """(exit status, stdout, stderr), or (None, ...) for a process that hung (then killed,
    after SIGUSR1 had it print its threads' stacks: the script registers faulthandler)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        proc.kill()
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


def test_an_event_before_the_main_threads_hub_exists_never_hangs_the_process() -> None:
    """Issue 20.1: the sender's native thread made a gevent hub through the patched
    ``socketpair`` and deadlocked with the main thread on import locks (9 runs in 10)."""
    with Collector() as koala:
        procs = [gevent_script("start", koala) for _ in range(RUNS)]
        results = [outcome(proc, 20) for proc in procs]
        hung = [err[-300:] for code, _, err in results if code is None]
        assert not hung, f"{len(hung)} of {RUNS} hung"
        assert all(code == 0 and '"flushed": true' in out for code, out, _ in results), results
        assert len(set(koala.message_ids())) == RUNS


def test_sigterm_ends_a_gevent_pywsgi_server_after_delivering() -> None:
    """Issue 20.2: the SIGTERM handler passed a greenlet's id to ``pthread_kill`` (hangs in
    11 runs of 20); now it is the OS thread's, and every server dies of SIGTERM."""
    with Collector() as koala:
        procs = [gevent_script("pywsgi", koala) for _ in range(RUNS)]
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, outcome(proc, 5)
            port = json.loads(line)["port"]
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                assert get(connection, "/", "gevent pywsgi sigterm")[0] == 200
            finally:
                connection.close()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        results = [outcome(proc, 15) for proc in procs]
        hung = [err[-3000:] for code, _, err in results if code is None]
        assert not hung, f"{len(hung)} of {RUNS} hung"
        assert all(code == -signal.SIGTERM for code, _, _ in results), [(c, e[-300:]) for c, _, e in results]
        assert len(set(koala.message_ids())) == RUNS


def test_the_senders_loop_connects_without_making_a_gevent_hub_in_its_thread() -> None:
    """asyncio's ``create_connection`` makes its socket with the patched ``socket.socket``,
    whose constructor creates a gevent hub in the sender's thread (the start-up deadlock of
    issue 20.1 again, for the pure-Python engine's connections): the sender's loop uses the
    original class."""
    with Collector() as koala:
        code, out, err = outcome(gevent_script("connect", koala), 20)
    assert code == 0 and json.loads(out)["hub"] is False, (out, err[-500:])
