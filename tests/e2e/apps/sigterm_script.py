"""A script that hands over batches, then gets SIGTERM: ``python -m tests.e2e.apps.sigterm_script MODE``.

Koala's address comes from ``KOALA_API_URL``, client options from ``FAULTS_CLIENT`` (as in
``faults_common``). It prints one JSON line (``{"handler": ...}``, which SIGTERM handler is
installed once the client exists) after handing over 5 batches, then, by MODE:

- ``wait``: sleeps until the signal comes (from the test);
- ``own-handler``: installs a handler of its own first, which prints ``"theirs"`` and exits 3;
- ``locked``: signals itself while its main thread holds the sender's queue lock, and
  holds it for 0.3 s more (the handler must not wait on it);
- ``exit``: signals itself and returns at once: interpreter exit (and its flush) begins
  while the handler's thread flushes too; neither may cut the other short;
- ``local-exit`` / ``local-sigterm``: the client lives in a function that returns (so it is
  garbage-collected with its batches pending), then the script ends, or signals itself;
- ``thread``: makes the client in a thread other than the main one (no handler possible);
- ``chained``: installs, after the client, a handler that prints ``"chaining"`` and calls
  the previous one (the client's), as apps and frameworks do.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading
import time
import uuid
from typing import Any

from koala_middleware import KoalaClient
from tests.e2e.apps.faults_common import client_from_env

kept: KoalaClient | None = None


def describe(handler: Any) -> str:
    if handler is signal.SIG_DFL:
        return "default"
    return getattr(handler, "__module__", "?") + "." + getattr(handler, "__name__", "?")


def hand_over(client: KoalaClient, count: int) -> None:
    for n in range(count):
        with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
            tracker.track("Stopping", {"n": n, "pid": os.getpid()})


def hand_over_and_forget() -> None:
    hand_over(client_from_env(), 5)


def main(mode: str) -> None:
    if mode.startswith("local-"):
        hand_over_and_forget()
        gc.collect()
        print(json.dumps({"handler": describe(signal.getsignal(signal.SIGTERM))}), flush=True)
        if mode == "local-sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
        return
    if mode == "own-handler":

        def theirs(signum: int, frame: object) -> None:
            print(json.dumps({"theirs": True}), flush=True)
            os._exit(3)

        signal.signal(signal.SIGTERM, theirs)
    if mode == "thread":
        made: list[KoalaClient] = []
        thread = threading.Thread(target=lambda: made.append(client_from_env()))
        thread.start()
        thread.join()
        client = made[0]
    else:
        client = client_from_env()
    hand_over(client, 5)
    if mode == "chained":
        previous = signal.getsignal(signal.SIGTERM)

        def chaining(signum: int, frame: Any) -> None:
            print(json.dumps({"chaining": True}), flush=True)
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, chaining)
    print(json.dumps({"handler": describe(signal.getsignal(signal.SIGTERM))}), flush=True)
    if mode == "locked":
        with client._sender._queue.lock:  # the lock every hand-over and the flush take
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # the handler ran in there; the flush waits for this lock
    if mode == "exit":
        global kept
        kept = client  # as a module-level client would be: exit hooks see live clients only
        os.kill(os.getpid(), signal.SIGTERM)
        return
    time.sleep(60)  # SIGTERM ends this


if __name__ == "__main__":
    main(sys.argv[1])
