"""One process of the spool chaos test: ``python -m tests.e2e.apps.spool_chaos KEY MODE``.

``KOALA_API_URL`` is Koala's address, ``SPOOL_DIR`` the shared spool directory. MODE:

- ``churn``: hands over one batch every few milliseconds until killed, printing each
  event's number once its hand-over returned (so it is on disk);
- ``deliver``: adopts what processes of its app left, waits until all of it is delivered,
  and prints its stats as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid

from koala_middleware import KoalaClient


def main(key: str, mode: str) -> None:
    client = KoalaClient(
        key,
        api_url=os.environ["KOALA_API_URL"],
        spool_dir=os.environ["SPOOL_DIR"],
        backoff_base=0.05,
        max_backoff=0.2,
        handle_sigterm=False,
    )
    if mode == "churn":
        n = 0
        while True:
            with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
                tracker.track("Chaos", {"n": n, "pid": os.getpid(), "key": key})
            print(n, flush=True)
            n += 1
            time.sleep(0.002)
    flushed = client.flush(30)
    print(json.dumps({"flushed": flushed, **dataclasses.asdict(client.stats)}), flush=True)
    client.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
