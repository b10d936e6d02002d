"""A small HTTP/1.1 load generator, run as its own process (never inside the server's).

``python -m tests.e2e.apps.faults_loadgen PORT REQUESTS CONNECTIONS [RATE]`` sends ``GET
/track?n=<i>`` for every i in ``range(REQUESTS)`` over ``CONNECTIONS`` kept-alive loopback
connections (at most RATE requests per second in all, when given), and prints one JSON
line: requests sent, 200s, seconds, latency percentiles.
Raw asyncio streams: an HTTP client library would be the bottleneck on 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def _connection(
    port: int, numbers: list[int], latencies: list[float], statuses: dict[int, int], interval: float
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    try:
        for index, n in enumerate(numbers):
            if interval:
                await asyncio.sleep(max(0.0, start + index * interval - time.perf_counter()))
            started = time.perf_counter()
            writer.write(f"GET /track?n={n} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: faults-loadgen\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            length = next(
                (int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:")), 0
            )
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def run(port: int, requests: int, connections: int, rate: float = 0.0) -> dict[str, object]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    interval = connections / rate if rate else 0.0
    started = time.perf_counter()
    await asyncio.gather(
        *(
            _connection(port, list(range(c, requests, connections)), latencies, statuses, interval)
            for c in range(connections)
        )
    )
    seconds = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return {
        "requests": requests,
        "ok": statuses.get(200, 0),
        "statuses": statuses,
        "seconds": round(seconds, 2),
        "rps": round(requests / seconds),
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "max_ms": pct(1.0),
    }


if __name__ == "__main__":
    port, requests, connections = (int(arg) for arg in sys.argv[1:4])
    rate = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    print(json.dumps(asyncio.run(run(port, requests, connections, rate))))
