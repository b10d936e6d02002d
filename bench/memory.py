"""Part 1 (memory): what a second client costs a process, and what a queued batch holds.

- A second client: ``tracemalloc``'s count of the bytes still allocated after making a
  second ``KoalaClient`` (the first pays for imports and module caches), and the same for
  its sender once started (its first batch taken).
- A queued batch: the process's resident memory (RSS, from ``/proc/self/statm``) grown by
  queueing ``BATCHES`` batches of the usual shape (an identify with an email and a trait,
  an event with a property, each visitor's own User-Agent and IP) to a sender parked on its
  first batch, divided by their number; next to it, the bytes the queue counts for each
  against ``max_queue_bytes``, which should be within 20% of it.

    python -m bench.memory           # the rows of part 1 (also run by part 1, in a subprocess)
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tracemalloc
import uuid
from pathlib import Path

from .common import Row, machine_line, markdown

ROOT = Path(__file__).resolve().parent.parent

BATCHES = 20_000


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def second_client() -> tuple[int, int]:
    """(bytes held by a second client, and by it with its sender started)."""
    from koala_middleware import KoalaClient

    from .inproc import ParkedKoala

    def make(koala: ParkedKoala) -> KoalaClient:
        return KoalaClient("pk_bench", api_url=koala.url, timeout=3600.0, max_in_flight=1)

    first_koala, second_koala = ParkedKoala(), ParkedKoala()  # made before the count starts
    first = make(first_koala)
    with first.tracker(profile_id=str(uuid.uuid4())) as tracker:
        tracker.track("Warm-up")
    first_koala.reached.wait(10)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    second = make(second_koala)
    gc.collect()
    made = tracemalloc.get_traced_memory()[0] - before
    with second.tracker(profile_id=str(uuid.uuid4())) as tracker:
        tracker.track("Warm-up")
    second_koala.reached.wait(10)
    gc.collect()
    started = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    first.shutdown(0)
    second.shutdown(0)
    return made, started


def queued_batch() -> tuple[float, float]:
    """(RSS grown per queued batch, bytes the queue counts per batch), in bytes."""
    from koala_middleware import KoalaClient

    from .inproc import USER_AGENT, ParkedKoala

    koala = ParkedKoala()
    client = KoalaClient(
        "pk_bench",
        api_url=koala.url,
        timeout=3600.0,
        max_in_flight=1,
        max_queue_batches=10 * BATCHES,
        max_queue_bytes=1 << 40,
    )
    with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
        tracker.track("Warm-up")
    koala.reached.wait(10)
    gc.collect()
    before = _rss()
    counted_before = client._sender._queue.pending_bytes
    for n in range(BATCHES):  # each visitor's strings made here: they are part of what is held
        with client.tracker(profile_id=str(uuid.uuid4()), user_agent=f"{USER_AGENT} v/{n}") as tracker:
            tracker.ip = f"203.0.{n >> 8 & 255}.{n & 255}"  # as a request's tracker reads it
            tracker.identify("ada@example.com", {"plan": "pro"})
            tracker.track("Created Workspace", {"seats": 3})
    gc.collect()
    grown = _rss() - before
    counted = client._sender._queue.pending_bytes - counted_before
    client.shutdown(0)
    return grown / BATCHES, counted / BATCHES


def measure() -> dict[str, float]:
    import logging

    logging.getLogger("koala_middleware").setLevel(logging.CRITICAL)  # parked clients' shutdown
    made, started = second_client()
    per_batch, counted = queued_batch()
    return {"client_made": made, "client_started": started, "batch_rss": per_batch, "batch_counted": counted}


def rows() -> list[Row]:
    """Part 1's memory rows, measured in a fresh process (the timing runs would have left
    freed memory for the queued batches to reuse)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--json"], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout
    found = json.loads(out.strip().splitlines()[-1])
    rss, counted = found["batch_rss"], found["batch_counted"]
    return [
        Row(
            "1m",
            "a second client in a process, made",
            f"{found['client_made'] / 1024:.1f} KB",
            None,
            "<= 40 KB",
            found["client_made"] <= 40 * 1024,
        ),
        Row(
            "1m",
            "a second client, its sender started",
            f"{found['client_started'] / 1024:.1f} KB",
            None,
            "<= 40 KB",
            found["client_started"] <= 40 * 1024,
        ),
        Row(
            "1m",
            f"RSS per queued batch ({BATCHES:,}, each visitor's own User-Agent)",
            f"{rss:.0f} B",
            None,
            "<= 700 B",
            rss <= 700,
        ),
        Row(
            "1m",
            "bytes the queue counts per batch (max_queue_bytes), over its RSS",
            f"{counted:.0f} B ({counted / rss:.2f}x)",
            None,
            "0.80x-1.20x",
            0.8 <= counted / rss <= 1.2,
        ),
    ]


def main() -> None:
    if "--json" in sys.argv:
        print(json.dumps(measure()))
        return
    print(f"Machine: {machine_line()}.")
    print("Run: `python -m bench.memory`.")
    print()
    print(markdown(rows()))


if __name__ == "__main__":
    main()
