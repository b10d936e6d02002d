"""Part 5: whole-process CPU per visitor, this library against PostHog's and Segment's SDKs.

For each visitor, one identify (an email and a trait) and one track (an event with a
property) are recorded and delivered to a local collector that answers at once (its own
process). Each SDK runs in a fresh subprocess of its own (``python -m bench.sdks --child
...``), with its default settings except where noted, pointed at the same collector:

- ``koala``: ``KoalaClient(api_url=...)``, a ``with client.tracker(profile_id, user_agent)``
  per visitor, ``identify`` + ``track``; the batch goes out when the block ends. One HTTP
  request per visitor: Koala's API takes one person per request. The default install's
  engine (``KOALA_ENGINE=python``); ``koala-copy`` is the same child again, a noise control
  that should read 0.95-1.05x of ``koala``; ``koala-curl`` runs the optional libcurl engine.
- ``posthog``: ``posthog.Client(host=...)``, ``set`` (a ``$set``, PostHog's identify with
  properties) + ``capture``; sent in batches of up to 100 events.
- ``segment``: ``segment.analytics.Client(host=...)``, ``identify`` + ``track``; batches
  of up to 100 messages.

PostHog's and Segment's ``max_queue_size`` are raised above the run's event count, so
that none of their events is dropped for a full queue (ours holds 10,000 batches). The
child warms up (100 visitors, delivered), then times N visitors from the first record to
the end of ``flush()``, with ``time.process_time()``: every thread of the process, the
SDK's sender included. The collector then counts what arrived (events and identifies in
the request bodies), which must be exactly what was recorded. "Recording only" runs the
same loop with sending off (``dry_run=True``, PostHog's and Segment's ``send=False``):
what building and checking a record costs. Rounds rotate the SDK order; the ratio to
Segment is the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .collector import CollectorProcess
from .common import Row, check, median, say

ROOT = Path(__file__).resolve().parent.parent
SDKS = ("koala", "koala-copy", "koala-curl", "posthog", "segment")
LABELS = {
    "koala": "koala-middleware (default engine)",
    "koala-copy": "koala-middleware (default engine), noise control",
    "koala-curl": "koala-middleware with [curl]",
    "posthog": "PostHog (posthog)",
    "segment": "Segment (segment-analytics-python)",
}
#: The engine each koala child runs (read by the sender when it starts).
ENGINES = {"koala": "python", "koala-copy": "python", "koala-curl": "curl"}
WARM_UP = 100
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"


# -- the child: one SDK, one process ---------------------------------------------------------


def koala(url: str, send: bool) -> tuple[Callable[[str, str], None], Callable[[], None]]:
    from koala_middleware import KoalaClient

    client = KoalaClient("pk_bench", api_url=url, dry_run=not send)

    def visit(visitor_id: str, email: str) -> None:
        with client.tracker(profile_id=visitor_id, user_agent=USER_AGENT) as tracker:
            tracker.identify(email, {"plan": "pro"})
            tracker.track("Created Workspace", {"seats": 3})

    def flush() -> None:
        if not client.flush(300):
            raise RuntimeError(f"koala: flush timed out: {client.stats}")

    return visit, flush


def posthog(url: str, send: bool) -> tuple[Callable[[str, str], None], Callable[[], None]]:
    import posthog as posthog_sdk

    client = posthog_sdk.Client("phc_bench", host=url, send=send, max_queue_size=1_000_000)

    def visit(visitor_id: str, email: str) -> None:
        client.set(distinct_id=visitor_id, properties={"email": email, "plan": "pro"})
        client.capture("Created Workspace", distinct_id=visitor_id, properties={"seats": 3})

    return visit, lambda: client.flush(timeout_seconds=None)


def segment(url: str, send: bool) -> tuple[Callable[[str, str], None], Callable[[], None]]:
    from segment import analytics

    client = analytics.Client("wk_bench", host=url, send=send, max_queue_size=1_000_000)

    def visit(visitor_id: str, email: str) -> None:
        client.identify(visitor_id, {"email": email, "plan": "pro"})
        client.track(visitor_id, "Created Workspace", {"seats": 3})

    return visit, client.flush


def child(sdk: str, url: str, visitors: int, send: bool) -> dict[str, float]:
    makers = {"koala": koala, "koala-copy": koala, "koala-curl": koala, "posthog": posthog, "segment": segment}
    visit, flush = makers[sdk](url, send)
    people = [(str(uuid.uuid4()), f"user{i}@example.com") for i in range(WARM_UP + visitors)]
    for visitor_id, email in people[:WARM_UP]:  # threads started, connections open, code warm
        visit(visitor_id, email)
    flush()
    cpu, wall = time.process_time(), time.perf_counter()
    for visitor_id, email in people[WARM_UP:]:
        visit(visitor_id, email)
    flush()
    return {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}


# -- the parent: rounds, checks, rows ----------------------------------------------------------


def run_child(sdk: str, url: str, visitors: int, send: bool) -> dict[str, float]:
    args = [sys.executable, "-m", "bench.sdks", "--child", sdk, "--url", url, "--visitors", str(visitors)]
    env = {**os.environ, "KOALA_ENGINE": ENGINES.get(sdk, "python")}
    done = subprocess.run(
        [*args, *([] if send else ["--no-send"])], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"{sdk} child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(quick: bool) -> list[Row]:
    visitors, rounds = (1_000, 1) if quick else (5_000, 3)
    cpu: dict[tuple[str, bool], list[float]] = {(sdk, send): [] for sdk in SDKS for send in (True, False)}
    with CollectorProcess(delay=0.0) as koala_stand_in:
        for round_ in range(rounds):
            order = SDKS[round_ % len(SDKS) :] + SDKS[: round_ % len(SDKS)]
            for sdk in order:
                for send in (True, False):
                    result = run_child(sdk, koala_stand_in.url, visitors, send)
                    items = koala_stand_in.items()
                    expected = 2 * (WARM_UP + visitors) if send else 0
                    if items != expected:
                        raise RuntimeError(f"{sdk}: the collector got {items} events and identifies, not {expected}")
                    per_visitor = result["cpu"] / visitors * 1e6
                    cpu[sdk, send].append(per_visitor)
                    say(
                        f"  sdks round {round_ + 1}: {sdk} {'deliver' if send else 'record only'}: "
                        f"{per_visitor:.0f} us CPU/visitor, {result['wall']:.2f} s wall, {items} items arrived"
                    )
    rows: list[Row] = []
    for send in (True, False):
        what = "record + deliver" if send else "recording only (sending off)"
        for sdk in SDKS:
            ratio = median([ours / theirs for ours, theirs in zip(cpu[sdk, send], cpu["segment", send], strict=True)])
            target, met = "", None
            if sdk == "koala" and send:
                to_posthog = median(
                    [ours / theirs for ours, theirs in zip(cpu[sdk, send], cpu["posthog", send], strict=True)]
                )
                target = f"<= 0.8x Segment and <= 0.5x PostHog (here {to_posthog:.2f}x PostHog)"
                met = check(ratio, 0.8) and to_posthog <= 0.5
            rows.append(
                Row(
                    "5",
                    f"{what}, {visitors:,} visitors: {LABELS[sdk]}",
                    f"{median(cpu[sdk, send]):.0f} us CPU/visitor",
                    ratio,
                    target,
                    met,
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=SDKS, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--visitors", type=int, default=5_000)
    parser.add_argument("--no-send", action="store_true")
    args = parser.parse_args()
    result: dict[str, Any] = child(args.child, args.url, args.visitors, not args.no_send)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
