"""Fork safety, for real: ``os.fork()`` with a running sender, and ``gunicorn --preload -w 2``.

A forked child must not share the parent's queue, locks, thread or sockets: it starts with
empty stats and a sender of its own, and the parent keeps delivering what it had queued.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from e2e.servers import ROOT, free_port, serve
from koala_middleware.testing import Collector

CHILDREN = 4


def test_forked_children_deliver_with_fresh_senders_and_the_parent_too() -> None:
    with Collector(delay=0.3) as koala:  # slow: the parent's batches are in flight at each fork
        done = subprocess.run(
            [sys.executable, "-m", "tests.e2e.apps.faults_fork", str(CHILDREN)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "KOALA_API_URL": koala.url},
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        *children, parent = (json.loads(line) for line in done.stdout.splitlines())
        events = koala.events()
        ids = koala.message_ids()

    assert parent["who"] == "parent" and parent["child_exits"] == [0] * CHILDREN
    assert len(children) == CHILDREN and {c["who"] for c in children} == {"child"}
    for child in children:
        # The child inherited nothing: no counters, no queue, no sender thread.
        assert child["inherited"]["enqueued"] == 0 and child["inherited"]["queued"] == 0
        assert "koala-sender" not in child["threads_at_fork"]
        assert child["flushed"] and child["stats"]["delivered"] == 5 and child["stats"]["dropped"] == {}
    sent = CHILDREN * 10 + 5
    assert parent["flushed"] and parent["stats"]["delivered"] == sent and parent["stats"]["dropped"] == {}
    # Everything arrived once, each from the process that recorded it.
    assert len(ids) == len(set(ids)) == sent + CHILDREN * 5
    sent_by = Counter((e["properties"]["who"], e["properties"]["pid"]) for e in events)
    assert sent_by == {("parent", parent["pid"]): sent, **{("child", c["pid"]): 5 for c in children}}


def test_gunicorn_preload_two_workers_deliver_from_both() -> None:
    """The app (and its client) are made in the master, which has sent a batch already."""
    port = free_port()
    with Collector() as koala:
        env = {"KOALA_API_URL": koala.url, "FAULTS_BOOT_EVENT": "1", "FAULTS_CLIENT": '{"shutdown_timeout": 5}'}
        args = ["gunicorn", "--preload", "-w", "2", "-b", f"127.0.0.1:{port}", "tests.e2e.apps.faults_wsgi:app"]
        with serve(args, port, env=env) as server:
            # Sync workers serve one request at a time: with 4 clients and slow handlers,
            # both must take requests.
            with httpx.Client(base_url=server.url, timeout=10) as http, ThreadPoolExecutor(4) as pool:
                statuses = list(
                    pool.map(lambda n: http.get("/track", params={"n": n, "sleep": 0.05}).status_code, range(40))
                )
            assert statuses == [200] * 40
            assert server.terminate() == 0
        events = koala.events()
        ids = koala.message_ids()

    [boot] = [e for e in events if e["event"] == "Booted"]
    requests = [e["properties"] for e in events if e["event"] == "Fault Request"]
    assert sorted(p["n"] for p in requests) == list(range(40)), "every request's event arrived once"
    assert len(ids) == len(set(ids)) == 41
    workers = {p["pid"] for p in requests}
    assert len(workers) == 2 and boot["properties"]["pid"] not in workers
    for pid in workers:  # each worker's counters started at zero, not at the master's
        assert min(p["enqueued_before"] for p in requests if p["pid"] == pid) == 0
