"""A process with a spooled client: ``python -m tests.e2e.apps.spool_script MODE COUNT``.

Koala's address comes from ``KOALA_API_URL``, client options from ``FAULTS_CLIENT`` (as in
``faults_common``; the tests pass ``spool_dir`` there). MODE:

- ``hold``: hands over COUNT batches (one event each, ``{"n": i, "pid": ...}``), prints
  ``{"handed_over": COUNT}`` once they are all on disk, then sleeps until killed;
- ``deliver``: hands over COUNT batches of its own, flushes (which waits for what it adopted
  too) and prints its stats as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid

from tests.e2e.apps.faults_common import client_from_env


def main(mode: str, count: int) -> None:
    client = client_from_env()
    for n in range(count):
        with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
            tracker.track("Spooled", {"n": n, "pid": os.getpid()})
    if mode == "hold":
        print(json.dumps({"handed_over": count, "stats": dataclasses.asdict(client.stats)}), flush=True)
        time.sleep(600)
    flushed = client.flush(20)
    print(json.dumps({"flushed": flushed, "pid": os.getpid(), **dataclasses.asdict(client.stats)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
