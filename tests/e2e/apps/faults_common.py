"""What the fault-injection apps share: a client configured from the environment.

``KOALA_API_URL`` points at the test's collector; ``FAULTS_CLIENT`` is a JSON object of
``KoalaClient`` options (``{"shutdown_timeout": 1, "max_queue_batches": 5}``); with
``FAULTS_BOOT_EVENT=1`` the module tracks one event at import, so that under
``gunicorn --preload`` the master's sender is running when the workers are forked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

from koala_middleware import KoalaClient, Tracker

EVENT = "Fault Request"
BOOT_EVENT = "Booted"


def client_from_env() -> KoalaClient:
    options = json.loads(os.environ.get("FAULTS_CLIENT", "{}"))
    client = KoalaClient("pk_test", api_url=os.environ["KOALA_API_URL"], **options)
    if os.environ.get("FAULTS_BOOT_EVENT") == "1":
        with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
            tracker.track(BOOT_EVENT, {"pid": os.getpid()})
    return client


def track(client: KoalaClient, tracker: Tracker, query: Mapping[str, str]) -> None:
    """One event per request, saying which process handled it and what it had sent before."""
    tracker.track(
        EVENT,
        {
            "n": int(query.get("n", "0")),
            "pid": os.getpid(),
            "enqueued_before": client.stats.enqueued,
        },
    )


def stats_json(client: KoalaClient, flush: float | None = None) -> bytes:
    """``client.stats`` as JSON (after a flush of at most ``flush`` seconds, if given)."""
    flushed = client.flush(flush) if flush is not None else None
    data: dict[str, Any] = dataclasses.asdict(client.stats)
    data.update(pid=os.getpid(), flushed=flushed)
    return json.dumps(data).encode()
