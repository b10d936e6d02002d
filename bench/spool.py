"""Part 6: what the on-disk spool (``spool_dir``) costs.

Hand-over: the calling thread's CPU per ``client._send(batch)`` with the spool and without,
rounds interleaved in one run; the difference is the spool's own cost (one SQLite insert,
committed to the WAL, before the hand-over returns). Throughput: batches/s to a Koala that
answers in 50 ms with the spool on (every delivered batch is also deleted from disk), and
the sender thread's CPU per batch, next to the same without the spool. The spool lives in
the system's temporary directory.
"""

from __future__ import annotations

import tempfile
import time

from koala_middleware import KoalaClient

from .collector import CollectorProcess
from .common import Row, check, median, say
from .delivery import DELAY, background, make_batches


def hand_over(url: str, count: int, spool_dir: str | None) -> float:
    """Microseconds of the caller's CPU per hand-over of a ready batch."""
    client = KoalaClient("pk_bench", api_url=url, spool_dir=spool_dir, handle_sigterm=False)
    try:
        for batch in make_batches(client, 100):  # warm up: sender thread, connections, spool file
            client._send(batch)
        if not client.flush(30):
            raise RuntimeError("warm-up batches were not delivered within 30 s")
        batches = make_batches(client, count)
        cpu = time.thread_time()
        for batch in batches:
            client._send(batch)
        cpu = time.thread_time() - cpu
        if not client.flush(60):
            raise RuntimeError(f"{count} batches were not delivered within 60 s")
        return cpu / count * 1e6
    finally:
        client.shutdown(timeout=5)


def run(quick: bool = False) -> list[Row]:
    rounds, count = (2, 1500) if quick else (3, 4000)
    handed: dict[str, list[float]] = {"memory": [], "spool": []}
    delivered: dict[str, list[tuple[float, float]]] = {"memory": [], "spool": []}
    with CollectorProcess(delay=DELAY) as koala:
        for index in range(rounds):
            say(f"spool: round {index + 1}/{rounds} (collector answers in {DELAY * 1000:.0f} ms)")
            for name in ("memory", "spool"):
                with tempfile.TemporaryDirectory(prefix="koala-bench-spool-") as spool_dir:
                    directory = spool_dir if name == "spool" else None
                    handed[name].append(hand_over(koala.url, count, directory))
                    options = {"spool_dir": directory} if directory else {}
                    delivered[name].append(background(koala.url, count, options))  # type: ignore[arg-type]
    extra = median([s - m for s, m in zip(handed["spool"], handed["memory"], strict=True)])
    rate = median([r for r, _ in delivered["spool"]])
    cpu = median([c for _, c in delivered["spool"]])
    plain_rate = median([r for r, _ in delivered["memory"]])
    plain_cpu = median([c for _, c in delivered["memory"]])
    ratio = median([s / m for (s, _), (m, _) in zip(delivered["spool"], delivered["memory"], strict=True)])
    return [
        Row(
            "6",
            "spool: CPU added to each hand-over (SQLite insert, WAL, synchronous=NORMAL)",
            f"{extra:.1f} us per batch ({median(handed['spool']):.1f} with, {median(handed['memory']):.1f} without)",
            None,
            "<= 30 us",
            check(extra, 30),
        ),
        Row(
            "6",
            "spool: background sender with spool_dir, 50 ms Koala",
            f"{rate:,.0f} batches/s, {cpu:.2f} ms sender CPU/batch (without: {plain_rate:,.0f}/s, {plain_cpu:.2f} ms)",
            ratio,
            ">= 1,000 batches/s",
            check(rate, 1000, at_most=False),
        ),
    ]
