"""A real ``os.fork()`` with a busy sender: ``python -m tests.e2e.apps.faults_fork CHILDREN``.

The parent hands over 10 batches (the test's collector is slow, so they are still queued or
in flight), forks a child, and repeats, CHILDREN times; then it hands over 5 more. Each child
reports the state it inherited, hands over 5 batches of its own and flushes. Every process
prints one JSON line (the parent last); the collector tells the rest: nothing lost, nothing
sent twice, each process delivered its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import uuid

from koala_middleware import KoalaClient

client = KoalaClient("pk_test", api_url=os.environ["KOALA_API_URL"], backoff_base=0.02, max_backoff=0.2)


def send(who: str, n: int) -> None:
    with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
        tracker.track("Forked", {"who": who, "n": n, "pid": os.getpid()})


def report(who: str, **extra: object) -> None:
    """One line, written at once: the children report concurrently on a shared pipe."""
    line = json.dumps({"who": who, "pid": os.getpid(), "stats": dataclasses.asdict(client.stats), **extra})
    os.write(1, (line + "\n").encode())


def child() -> None:
    inherited = dataclasses.asdict(client.stats)
    threads = sorted(t.name for t in threading.enumerate())
    for n in range(5):
        send("child", n)
    flushed = client.flush(20)
    report("child", inherited=inherited, threads_at_fork=threads, flushed=flushed)
    client.shutdown(2)


def main(children: int) -> None:
    pids = []
    for k in range(children):
        for n in range(10):
            send("parent", k * 10 + n)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                child()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for n in range(5):
        send("parent", children * 10 + n)
    flushed = client.flush(20)
    exits = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    report("parent", flushed=flushed, child_exits=exits)
    client.shutdown(2)


if __name__ == "__main__":
    main(int(sys.argv[1]))
