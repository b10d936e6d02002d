#!/usr/bin/env python3
"""Run the koala-middleware benchmarks and print a Markdown table for the README.

    python3 scripts/dev.py bench                  # everything, a few minutes on 2 cores
    python3 scripts/dev.py bench --quick          # fewer, shorter rounds (about a minute)
    python3 scripts/dev.py bench --only inproc    # one part: inproc, servers, isolation, delivery, sdks, spool, pixel

Parts: (1) in-process cost per request, Starlette and Flask, bare vs middleware, with
Starlette's SessionMiddleware as a yardstick; (2) requests/s and latency through uvicorn and
gunicorn; (3) isolation from a slow Koala; (4) the sender's batches/s to a 50 ms Koala;
(5) whole-process CPU per visitor against PostHog's and Segment's SDKs;
(6) the on-disk spool's cost per hand-over and its batches/s to a 50 ms Koala;
(7) the first-party pixel: pixel_path's cost on other requests, proxied latency vs direct;
(8) failure scenarios: a Koala that refuses some batches, half-fails, flaps, or is down.
Every figure is a ratio within one run (interleaved rounds, medians), printed with the
machine it ran on. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: make ``bench`` and the package importable

from bench import common  # noqa: E402

PARTS = ("inproc", "servers", "isolation", "delivery", "sdks", "spool", "pixel", "failures")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds: a smoke run")
    args = parser.parse_args(argv)
    parts = args.only or [part for part in PARTS if part != "failures"]  # 9 minutes: on request only

    rows: list[common.Row] = []
    started = time.monotonic()
    common.say(f"machine: {common.machine_line()}")
    if "inproc" in parts:
        from bench import inproc

        rows += inproc.run(args.quick)
    if "servers" in parts:
        from bench import servers

        rows += servers.run_throughput(args.quick)
    if "isolation" in parts:
        from bench import servers

        rows += servers.run_isolation(args.quick)
    if "delivery" in parts:
        from bench import delivery

        rows += delivery.run(args.quick)
    if "sdks" in parts:
        from bench import sdks

        rows += sdks.run(args.quick)
    if "spool" in parts:
        from bench import spool

        rows += spool.run(args.quick)
    if "pixel" in parts:
        from bench import pixel

        rows += pixel.run(args.quick)
    if "failures" in parts:
        from bench import failures

        rows += failures.run(args.quick)
    took = time.monotonic() - started

    print(f"Machine: {common.machine_line()}.")
    print(f"Run: `python3 scripts/dev.py bench{' --quick' if args.quick else ''}` ({', '.join(parts)}; {took:.0f} s).")
    print()
    print(common.markdown(rows))
    missed = [row for row in rows if row.met is False]
    if missed:
        print()
        print(f"{len(missed)} target(s) missed: " + "; ".join(f"{r.part} {r.case}" for r in missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
