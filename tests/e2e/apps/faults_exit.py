"""Interpreter exit with a live client: ``python -m tests.e2e.apps.faults_exit COUNT``.

Hands over COUNT batches and falls off the end, leaving the flush to the client's own
``atexit`` hook (options from ``FAULTS_CLIENT``, as in ``faults_common``). A hook registered
*before* importing the package runs *after* the client's (atexit is last in, first out) and
prints the final stats and the time, so the test sees what exit did and how long it took.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import sys
import time

_client = None


@atexit.register
def _report() -> None:
    stats = dataclasses.asdict(_client.stats) if _client is not None else None
    print(json.dumps({"exited_at": time.time(), "stats": stats}), flush=True)


def main(count: int) -> None:
    global _client
    import uuid

    from tests.e2e.apps.faults_common import client_from_env

    _client = client = client_from_env()
    for n in range(count):
        with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
            tracker.track("Exiting", {"n": n})
    print(json.dumps({"handed_over_at": time.time()}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
