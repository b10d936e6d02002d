"""Part 8: failure scenarios, the long versions of tests/test_failure_policy.py (issue 19).

The real ``KoalaClient`` (default options unless a row says otherwise) sends to the local
collector (``koala_middleware.testing.Collector``, in this process: what matters here is
when batches arrive, not CPU), which is made to half-work: refuse some batches always, answer
503 to a random half of all requests, go down (connection refused) and come back. A driver
thread hands batches over at a fixed rate, as a busy app would; every healthy batch's
message id is then looked up among the accepted requests, with its arrival time.

    python -m bench.failures            # every scenario at full length (about 9 minutes)
    python -m bench.failures --quick    # each scenario a sixth as long
    python -m bench.failures --cpu-ab OLD_TREE   # part 4's sender CPU per batch, this tree
                                                 # against OLD_TREE (and a copy of it, the
                                                 # noise control), rounds interleaved

The "Koala down 10 minutes" scenario runs with time scaled by 1/10: down 60 s, with
``max_queue_batches=1,000`` (a tenth of the default) so that the queue fills as it would.
"""

from __future__ import annotations

import argparse
import itertools
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from koala_middleware import KoalaClient
from koala_middleware.testing import Collector, Received

from .common import Row, check, median, say

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    """What one scenario's run handed over, and when."""

    healthy: list[str] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0


def refused(received: Received) -> bool:
    return b'"Refused"' in received.body


def hand_over(client: KoalaClient, rate: float, seconds: float, refuse: Callable[[int], bool]) -> Run:
    """``rate`` batches a second for ``seconds``, like requests of an app; healthy ids kept."""
    run = Run(start=time.monotonic())
    for n in itertools.count():
        due = run.start + n / rate
        now = time.monotonic()
        if due - run.start >= seconds:
            break
        if due > now:
            time.sleep(due - now)
        with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
            message_id = tracker.track("Refused" if refuse(n) else "Healthy")
        if not refuse(n):
            run.healthy.append(message_id)
    run.end = time.monotonic()
    return run


def arrivals(koala: Collector) -> dict[str, float]:
    """Each accepted message id's first arrival time."""
    seen: dict[str, float] = {}
    for received in koala.requests():
        for event in received.json().get("events", []):
            seen.setdefault(event["message_id"], received.at)
    return seen


def longest_gap(koala: Collector, start: float, end: float) -> float:
    times = sorted(r.at for r in koala.requests() if start <= r.at <= end)
    edges = [start, *times, end]
    return max(later - earlier for earlier, later in itertools.pairwise(edges))


def drain(client: KoalaClient, limit: float = 120.0) -> float:
    """Seconds until everything handed over is finished (``limit`` if not by then)."""
    started = time.monotonic()
    client.flush(limit)
    return time.monotonic() - started


def dropped(client: KoalaClient) -> str:
    drops = client.stats.dropped
    return ", ".join(f"{count:,} {reason}" for reason, count in sorted(drops.items())) or "0 dropped"


def client_for(koala: Collector, **options: Any) -> KoalaClient:
    return KoalaClient("pk_bench", api_url=koala.url, handle_sigterm=False, **options)


def refused_ahead(koala: Collector) -> Row:
    """8 batches Koala always refuses, then 1,000 healthy ones."""
    koala.answer_with(lambda r: 500 if refused(r) else 200)
    client = client_for(koala)
    try:
        for _ in range(8):
            with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
                tracker.track("Refused")
        deadline = time.monotonic() + 5
        while len(koala.requests(accepted_only=False)) < 8 and time.monotonic() < deadline:
            time.sleep(0.005)
        start = time.monotonic()
        ids = []
        for _ in range(1000):
            with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
                ids.append(tracker.track("Healthy"))
        deadline = start + 120
        while len(koala.requests()) < 1000 and time.monotonic() < deadline:
            time.sleep(0.005)
        seen = arrivals(koala)
        took = max((seen.get(i, float("inf")) for i in ids), default=0.0) - start
        return Row(
            "8",
            "8 refused batches ahead of 1,000 healthy ones",
            f"all healthy delivered in {took:.2f} s; {dropped(client)}",
            None,
            "<= 2 s",
            check(took, 2.0),
        )
    finally:
        client.shutdown(0.5)
        koala.reset()
        koala.clear()


def refused_share(koala: Collector, seconds: float) -> Row:
    """5% of batches refused, 200 batches/s."""
    koala.answer_with(lambda r: 500 if refused(r) else 200)
    client = client_for(koala)
    try:
        run = hand_over(client, 200, seconds, lambda n: n % 20 == 7)
        seen = arrivals(koala)
        during = sum(seen.get(i, float("inf")) <= run.end for i in run.healthy) / len(run.healthy)
        drops = client.stats.dropped
        # A refused batch is only ever given up (retries_exhausted); healthy ones never are.
        healthy_dropped = sum(drops.values()) - drops.get("retries_exhausted", 0)
        return Row(
            "8",
            f"5% of batches refused, 200 batches/s for {seconds:.0f} s",
            f"{during:.1%} of {len(run.healthy):,} healthy delivered during the run; {dropped(client)} "
            "(the refused ones)",
            None,
            ">= 99%, 0 healthy dropped",
            during >= 0.99 and healthy_dropped == 0,
        )
    finally:
        client.shutdown(0.5)
        koala.reset()
        koala.clear()


def brownout(koala: Collector, seconds: float) -> Row:
    """Koala answers 503 to a random half of all requests."""
    coin = random.Random(19)
    lock = threading.Lock()

    def half(received: Received) -> int:
        with lock:
            return 503 if coin.random() < 0.5 else 200

    koala.answer_with(half)
    client = client_for(koala)
    try:
        run = hand_over(client, 200, seconds, lambda n: False)
        koala.answer_with(200)
        after = drain(client)
        seen = arrivals(koala)
        during = sum(seen.get(i, float("inf")) <= run.end for i in run.healthy) / len(run.healthy)
        lost = sum(i not in seen for i in run.healthy)
        attempts = len(koala.requests(accepted_only=False))
        return Row(
            "8",
            f"503 to a random 50% of requests, 200 batches/s for {seconds:.0f} s",
            f"{during:.1%} of {len(run.healthy):,} delivered during it, all within {after:.1f} s of its end; "
            f"{dropped(client)}, {lost} missing; {attempts / len(run.healthy):.2f} requests/batch",
            None,
            ">= 90% during, 0 dropped, all within 10 s",
            during >= 0.9 and not client.stats.dropped and not lost and after <= 10,
        )
    finally:
        client.shutdown(0.5)
        koala.reset()
        koala.clear()


def flapping(koala: Collector, seconds: float, period: float = 5.0) -> Row:
    """Koala up ``period`` s, down ``period`` s (connection refused), 200 batches/s."""
    client = client_for(koala, max_queue_batches=6000)
    stop = threading.Event()
    state = {"up": True}

    def flap() -> None:
        while not stop.wait(period):
            koala.down()
            state["up"] = False
            if stop.wait(period):
                break
            koala.up()
            state["up"] = True

    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    try:
        run = hand_over(client, 200, seconds, lambda n: False)
        stop.set()
        flapper.join()
        if not state["up"]:
            koala.up()
        after = drain(client)
        gap = longest_gap(koala, run.start, run.end)
        seen = arrivals(koala)
        lost = sum(i not in seen for i in run.healthy)
        return Row(
            "8",
            f"Koala up {period:g} s / down {period:g} s, 200 batches/s for {seconds:.0f} s",
            f"longest gap in deliveries {gap:.1f} s; all within {after:.1f} s of the end; "
            f"{dropped(client)}, {lost} missing of {len(run.healthy):,}",
            None,
            "gap <= 7 s, 0 dropped, all within 10 s",
            gap <= 7 and not client.stats.dropped and not lost and after <= 10,
        )
    finally:
        client.shutdown(0.5)
        koala.clear()


def long_outage(koala: Collector, seconds: float) -> Row:
    """Koala down for ``seconds`` then up, 100 batches/s (time scaled: see the docstring)."""
    client = client_for(koala, max_queue_batches=1000)
    try:
        koala.down()
        hand_over(client, 100, seconds, lambda n: False)
        queued = client.stats.queued
        koala.up()
        back = time.monotonic()
        after = drain(client)
        times = sorted(r.at for r in koala.requests())
        first = (times[0] - back) if times else float("nan")
        rate = len(times) / max(times[-1] - times[0], 1e-3) if len(times) > 1 else float("nan")
        drops = client.stats.dropped
        return Row(
            "8",
            f"Koala down {seconds:.0f} s then up, 100 batches/s (10 minutes scaled by 1/10, max_queue_batches=1,000)",
            f"{queued:,} queued at the return: first delivered {first:.2f} s after it, all in {after:.1f} s "
            f"({rate:,.0f} batches/s); {dropped(client)}",
            None,
            "queue delivered within seconds, drops only queue_full",
            after <= 10 and set(drops) <= {"queue_full"},
        )
    finally:
        client.shutdown(0.5)
        koala.clear()


def run(quick: bool = False) -> list[Row]:
    scale = 1 / 6 if quick else 1.0
    rows = []
    with Collector() as koala:
        say("failures: 8 refused batches ahead of 1,000 healthy ones")
        rows.append(refused_ahead(koala))
        say(f"failures: 5% refused, {60 * scale:.0f} s")
        rows.append(refused_share(koala, 60 * scale))
        say(f"failures: 50% brownout, {90 * scale:.0f} s")
        rows.append(brownout(koala, 90 * scale))
        say(f"failures: flapping, {240 * scale:.0f} s")
        rows.append(flapping(koala, 240 * scale))
        say(f"failures: down {60 * scale:.0f} s then up")
        rows.append(long_outage(koala, 60 * scale))
    return rows


# -- part 4's sender CPU per batch, this tree against another, in one interleaved run ----------

_CPU_SNIPPET = """
import sys
from bench.delivery import background
rate, cpu = background(sys.argv[1], int(sys.argv[2]), {})
print(rate, cpu)
"""


def cpu_ab(old_tree: Path, rounds: int = 6, count: int = 4000) -> list[Row]:
    """Sender CPU per batch (part 4's ``background``) of the package in ``old_tree`` and in
    this tree, each round in fresh processes, order rotated. The noise control is a copy of
    ``old_tree`` in another directory: it reads 1.00x unless the machine (or where a tree
    lies) biases the figures."""
    from .collector import CollectorProcess

    control = Path(tempfile.mkdtemp(prefix="koala-bench-control-")) / "tree"
    shutil.copytree(old_tree, control, ignore=shutil.ignore_patterns("__pycache__", ".git"))
    variants = {"before (old tree)": old_tree, "after": ROOT, "before, a copy (noise control)": control}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with CollectorProcess(delay=0.05) as koala:
        for index in range(rounds):
            order = list(variants)
            order = order[index % len(order) :] + order[: index % len(order)]
            say(f"cpu a/b: round {index + 1}/{rounds}: {', '.join(order)}")
            for name in order:
                tree = variants[name]
                output = subprocess.run(
                    [sys.executable, "-c", _CPU_SNIPPET, koala.url, str(count)],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=tree,  # its package first on sys.path (and its copy of bench.delivery)
                    env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                ).stdout.split()
                results[name].append((float(output[0]), float(output[1])))
    before = [cpu for _, cpu in results["before (old tree)"]]
    rows = []
    for name in variants:
        cpus = [cpu for _, cpu in results[name]]
        ratio = median([after / old for after, old in zip(cpus, before, strict=True)])
        rows.append(
            Row(
                "4",
                f"sender CPU per batch, {name}",
                f"{median(cpus):.3f} ms, {median([r for r, _ in results[name]]):,.0f} batches/s",
                ratio,
                "after <= 1.05x before" if name == "after" else "",
                check(ratio, 1.05) if name == "after" else None,
            )
        )
    return rows


def main() -> None:
    from .common import machine_line, markdown

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cpu-ab", type=Path, metavar="OLD_TREE", help="only the CPU A/B against OLD_TREE")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    say(f"machine: {machine_line()}")
    rows = cpu_ab(args.cpu_ab.resolve(), args.rounds) if args.cpu_ab else run(args.quick)
    print(markdown(rows))


if __name__ == "__main__":
    main()
