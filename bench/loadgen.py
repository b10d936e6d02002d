"""A small closed-loop HTTP/1.1 load generator, run in its own process.

``python -m bench.loadgen --port 8000 --path / --connections 8 --seconds 3`` keeps
``connections`` kept-alive sockets busy (one request in flight on each) for ``seconds``
after a short warm-up, and prints one JSON line: requests, errors, requests/s and latency
percentiles in milliseconds. Loopback only; bounded in time and in requests.

It is plain ``selectors`` and pre-built request bytes, so it spends little CPU per request:
on a 2-core machine the server under test should be the bottleneck, not this.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import time

HOST = "127.0.0.1"
MAX_REQUESTS = 2_000_000


class Connection:
    __slots__ = ("buffer", "expected", "sock", "started")

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buffer = b""
        self.started = 0
        self.expected = -1


def response_length(buffer: bytes) -> tuple[int, bool, int]:
    """(total bytes of the response or -1 if headers are incomplete, keep-alive?, status)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return -1, True, 0
    head = buffer[:end].lower()
    status = int(head[9:12])
    length = 0
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop > 0 else None])
    keep_alive = b"\r\nconnection: close" not in head
    return end + 4 + length, keep_alive, status


def run(port: int, path: str, cookie: str, connections: int, seconds: float, warmup: float) -> dict[str, float]:
    headers = [f"GET {path} HTTP/1.1", f"Host: localhost:{port}", "User-Agent: koala-bench/1.0", "Accept: */*"]
    if cookie:
        headers.append(f"Cookie: {cookie}")
    request = ("\r\n".join(headers) + "\r\n\r\n").encode()
    selector = selectors.DefaultSelector()
    latencies: list[int] = []
    errors = 0

    def send(conn: Connection) -> None:
        conn.started = time.perf_counter_ns()
        conn.buffer = b""
        conn.sock.sendall(request)

    for _ in range(connections):
        conn = Connection(port)
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        send(conn)
    start = time.perf_counter_ns()
    measure_from = start + int(warmup * 1e9)
    stop_at = measure_from + int(seconds * 1e9)
    measured_start = 0
    done = False
    while not done:
        for key, _ in selector.select(timeout=1.0):
            conn = key.data
            try:
                chunk = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""  # reset by the server: count it, reconnect
            if not chunk:
                errors += 1
                selector.unregister(conn.sock)
                conn.sock.close()
                conn = Connection(port)
                selector.register(conn.sock, selectors.EVENT_READ, conn)
                send(conn)
                continue
            conn.buffer += chunk
            total, keep_alive, status = response_length(conn.buffer)
            if total < 0 or len(conn.buffer) < total:
                continue
            now = time.perf_counter_ns()
            if now >= measure_from:
                if not measured_start:
                    measured_start = now
                if 200 <= status < 300:
                    latencies.append(now - conn.started)
                else:
                    errors += 1
            if now >= stop_at or len(latencies) >= MAX_REQUESTS:
                done = True
                break
            if not keep_alive:
                selector.unregister(conn.sock)
                conn.sock.close()
                conn = Connection(port)
                selector.register(conn.sock, selectors.EVENT_READ, conn)
            send(conn)
        if time.perf_counter_ns() > stop_at + 10 * 10**9:
            break  # the server stopped answering: give up rather than hang
    elapsed = (time.perf_counter_ns() - (measured_start or start)) / 1e9
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    latencies.sort()

    def pct(fraction: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(fraction * len(latencies)))] / 1e6

    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--cookie", default="")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args()
    print(json.dumps(run(args.port, args.path, args.cookie, args.connections, args.seconds, args.warmup)))


if __name__ == "__main__":
    main()
