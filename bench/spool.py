"""Part 6: what the on-disk spool (``spool_dir``) costs.

Hand-over: the calling thread's CPU per ``client._send(batch)`` with the spool and without,
rounds interleaved in one run; the difference is the spool's own cost (one SQLite insert,
committed to the WAL, before the hand-over returns). Throughput: batches/s to a Koala that
answers in 50 ms with the spool on (every delivered batch is also deleted from disk), and
the sender thread's CPU per batch, next to the same without the spool. The spool lives in
the system's temporary directory.

Hand-over latency: the wall time of each ``client._send(batch)`` (one every millisecond,
while the sender delivers to a 50 ms Koala, deletes delivered rows and rotates its files),
with the spool on a normal disk, on a disk whose ``fsync``/``fdatasync`` take 200 ms (an
``LD_PRELOAD`` shim built here with the C compiler, skipped with a message where there is
none), and without the spool. Each variant runs in a child process (``LD_PRELOAD`` applies
from a process's start); the first hand-over after construction is reported apart.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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


SLOW_FSYNC_MS = 200
_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>
static useconds_t slow(void) {
    const char *ms = getenv("SLOW_FSYNC_MS");
    return (useconds_t)(ms ? atoi(ms) : 200) * 1000;
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    usleep(slow());
    return real(fd);
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    usleep(slow());
    return real(fd);
}
"""


def build_slow_fsync_shim(directory: str) -> str | None:
    """An ``LD_PRELOAD`` library whose fsync/fdatasync sleep SLOW_FSYNC_MS first, or None
    (with a message) where there is no C compiler or not Linux."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None or not sys.platform.startswith("linux"):
        say("spool: no C compiler (or not Linux): the slow-fsync latency run is skipped")
        return None
    source, library = os.path.join(directory, "slowfsync.c"), os.path.join(directory, "slowfsync.so")
    with open(source, "w") as file:
        file.write(_SHIM)
    built = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", library, source, "-ldl"], capture_output=True)
    if built.returncode != 0:
        say(f"spool: building the slow-fsync shim failed, latency run skipped: {built.stderr.decode()[:300]}")
        return None
    return library


def latency(url: str, count: int, spool_dir: str | None) -> dict[str, float]:
    """In this process: milliseconds per hand-over (first, p50, p99, max), paced 1 ms apart."""
    client = KoalaClient("pk_bench", api_url=url, spool_dir=spool_dir, handle_sigterm=False)
    try:
        batches = make_batches(client, count + 1)
        started = time.perf_counter()
        client._send(batches[0])
        first = time.perf_counter() - started
        durations = []
        for batch in batches[1:]:
            started = time.perf_counter()
            client._send(batch)
            durations.append(time.perf_counter() - started)
            time.sleep(0.001)
        if not client.flush(60):
            raise RuntimeError(f"{count} batches were not delivered within 60 s")
    finally:
        client.shutdown(timeout=5)
    durations.sort()
    return {
        "first": first * 1e3,
        "p50": durations[len(durations) // 2] * 1e3,
        "p99": durations[int(len(durations) * 0.99)] * 1e3,
        "max": durations[-1] * 1e3,
    }


def latency_in_child(url: str, count: int, spool_dir: str | None, preload: str | None) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    if preload:
        env["LD_PRELOAD"] = preload
        env["SLOW_FSYNC_MS"] = str(SLOW_FSYNC_MS)
    args = [sys.executable, "-m", "bench.spool", "latency", url, str(count), spool_dir or ""]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"latency child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def latency_rows(url: str, quick: bool) -> list[Row]:
    count = 1500 if quick else 4000  # past ROTATE_EVERY: rotations and checkpoints happen meanwhile
    with tempfile.TemporaryDirectory(prefix="koala-bench-shim-") as build:
        shim = build_slow_fsync_shim(build)
        variants: list[tuple[str, bool, str | None]] = [("without spool", False, None), ("spool", True, None)]
        if shim is not None:
            variants.append((f"spool, fsync {SLOW_FSYNC_MS} ms", True, shim))
        found: dict[str, dict[str, float]] = {}
        for name, spooled, preload in variants:
            say(f"spool: hand-over latency, {name}")
            with tempfile.TemporaryDirectory(prefix="koala-bench-spool-") as spool_dir:
                found[name] = latency_in_child(url, count, spool_dir if spooled else None, preload)
    rows = []
    for name, figures in found.items():
        slow = "fsync" in name
        rows.append(
            Row(
                "6",
                f"spool: hand-over wall time, {name} (1 per ms, 50 ms Koala)",
                f"p50 {figures['p50']:.3f} ms, p99 {figures['p99']:.3f} ms, max {figures['max']:.1f} ms; "
                f"first {figures['first']:.2f} ms",
                None,
                "p99 <= 5 ms" if slow else "-",
                check(figures["p99"], 5.0) if slow else None,
            )
        )
    return rows


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
        latencies = latency_rows(koala.url, quick)
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
        *latencies,
    ]


if __name__ == "__main__" and sys.argv[1:2] == ["latency"]:
    _, _, url, count, directory = sys.argv
    print(json.dumps(latency(url, int(count), directory or None)))
