"""The local Koala stand-in in a process of its own, so its work is not timed with ours.

``python -m bench.collector --delay 0.05`` prints its URL on the first line, then answers
``count`` on stdin with the number of requests it accepted so far, and ``items`` with the
number of records in the bodies accepted since the last ``count`` or ``items`` (the items of every list
at the top of a JSON body: Koala's ``events`` and ``identifies``, PostHog's and Segment's
``batch``); it exits when stdin closes (so it never outlives the benchmark that started it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from koala_middleware.testing import Collector

ROOT = Path(__file__).resolve().parent.parent


class CollectorProcess:
    """Start ``bench.collector`` in a subprocess; ``with`` it to stop it."""

    def __init__(self, delay: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.collector", "--delay", str(delay)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"the collector did not start: {self.url!r}")

    def count(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def items(self) -> int:
        """Records (events, identifies, ...) in the bodies accepted since the last ``count``/``items``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("items\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> CollectorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    accepted = 0
    with Collector(delay=args.delay) as koala:
        print(koala.url, flush=True)
        for line in sys.stdin:
            if line.strip() == "count":
                # Count, then forget what arrived: only the count matters, and memory stays flat.
                # (A request answered between the two lines is lost to the count: only ask when idle.)
                accepted += len(koala.requests())
                koala.clear()
                print(accepted, flush=True)
            elif line.strip() == "items":
                received = koala.requests()
                koala.clear()
                print(sum(_items(r.body) for r in received), flush=True)


def _items(body: bytes) -> int:
    try:
        decoded = json.loads(body)
    except ValueError:
        return 0
    if not isinstance(decoded, dict):
        return 0
    return sum(len(value) for value in decoded.values() if isinstance(value, list))


if __name__ == "__main__":
    main()
