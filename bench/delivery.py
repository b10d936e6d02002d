"""Part 4: how many batches per second the sender delivers to a Koala that takes 50 ms.

The collector runs in another process and answers every request after 50 ms. The real
``KoalaClient`` (its ``BackgroundSender``) is handed N ready batches at once and timed until
``flush()`` returns; in the same run, rounds interleaved, a sequential sender (one
``httpx.Client`` posting one batch after another) shows what the concurrency buys. The
sender thread's own CPU time is read from its per-thread clock (Linux), so the figure is
CPU per delivered batch, not wall time. A bare asyncio HTTP/1.1 sender, written here and
nowhere else, is the yardstick for what the machine allows when HTTP costs next to nothing.

The engine was chosen by the "candidates" rows: the same batches posted by each HTTP layer
alone (100 in flight, kept-alive connections, no retry logic), CPU per request: the sharded
httpx transports the sender used first, aiohttp (what it used next), h11 driven on asyncio
streams, the package's two engines (``python``: h11 on asyncio Protocols, the default;
``curl``: libcurl through pycurl, the optional accelerator), and ``python, copy``: the same
default engine a second time, a noise control that should read the same as ``python``.
The background-sender rows run with ``KOALA_ENGINE`` set to each engine.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import h11
import httpx

from koala_middleware import Batch, KoalaClient
from koala_middleware._delivery._curl import CurlEngine
from koala_middleware._delivery._engine import ENGINE_VARIABLE, Route
from koala_middleware._delivery._h11 import AsyncEngine
from koala_middleware._delivery._request import build

from .collector import CollectorProcess
from .common import Row, check, median, say

DELAY = 0.05


def make_batches(client: KoalaClient, count: int) -> list[Batch]:
    """``count`` realistic visitor batches (an identify and an event each), built up front."""
    batches: list[Batch] = []
    for _ in range(count):
        tracker = client.tracker(profile_id=str(uuid.uuid4()), user_agent="Mozilla/5.0 (bench)")
        tracker.identify("ada@example.com", {"plan": "pro"})
        tracker.track("Created Workspace", {"seats": 3})
        batches.extend(tracker.batches())
    return batches


def thread_cpu(thread: threading.Thread | None) -> float:
    """CPU seconds ``thread`` used so far (process CPU where per-thread clocks are missing)."""
    if thread is not None and thread.ident is not None and hasattr(time, "pthread_getcpuclockid"):
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except OSError:
            pass
    return time.process_time()


def sender_thread() -> threading.Thread | None:
    return next((t for t in threading.enumerate() if t.name == "koala-sender" and t.is_alive()), None)


def background(url: str, count: int, options: dict[str, Any]) -> tuple[float, float]:
    """(batches/s, sender CPU ms per batch) for ``count`` batches handed over at once."""
    options = dict(options)
    os.environ[ENGINE_VARIABLE] = options.pop("engine", "python")  # read when the sender starts
    client = KoalaClient("pk_bench", api_url=url, **options)
    try:
        for batch in make_batches(client, 100):  # warm up: start the thread, open connections
            client._send(batch)
        if not client.flush(30):
            raise RuntimeError("warm-up batches were not delivered within 30 s")
        batches = make_batches(client, count)
        thread = sender_thread()
        cpu = thread_cpu(thread)
        start = time.perf_counter()
        for batch in batches:
            client._send(batch)
        if not client.flush(120):
            raise RuntimeError(f"{count} batches were not delivered within 120 s")
        wall = time.perf_counter() - start
        cpu = thread_cpu(thread) - cpu
        stats = client.stats
        if stats.delivered != count + 100 or stats.dropped_total:
            raise RuntimeError(f"not every batch was delivered: {stats}")
        return count / wall, cpu / count * 1000
    finally:
        client.shutdown(timeout=5)


def sequential(url: str, seconds: float) -> tuple[float, float]:
    """(batches/s, CPU ms per batch) of one ``httpx.Client`` posting one batch at a time."""
    client = KoalaClient("pk_bench", api_url=url, dry_run=True)  # only to build the bodies
    batches = make_batches(client, 400)
    client.shutdown(timeout=0)
    sent = 0
    with httpx.Client(timeout=5) as http:
        cpu = time.thread_time()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds and sent < len(batches):
            batch = batches[sent]
            response = http.post(
                f"{url}/web/projects/pk_bench{batch.path}",
                content=batch.body,
                headers={"Content-Type": "application/json", "User-Agent": batch.user_agent},
            )
            response.raise_for_status()
            sent += 1
        wall = time.perf_counter() - start
        cpu = time.thread_time() - cpu
    return sent / wall, cpu / sent * 1000


def reference(url: str, count: int, connections: int = 100) -> tuple[float, float]:
    """(batches/s, CPU ms per batch) of a bare asyncio HTTP/1.1 sender: a yardstick, not a product.

    ``connections`` kept-alive sockets, one request in flight on each, requests written by
    hand, responses read by Content-Length. It shows what the CPU allows when the HTTP
    stack costs next to nothing; it handles none of what the real sender must (TLS,
    chunked bodies, retries, timeouts).
    """
    client = KoalaClient("pk_bench", api_url=url, dry_run=True)  # only to build the bodies
    batches = make_batches(client, count)
    client.shutdown(timeout=0)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80

    async def worker(queue: list[Batch]) -> int:
        reader, writer = await asyncio.open_connection(host, port)
        sent = 0
        try:
            while queue:
                batch = queue.pop()
                head = (
                    f"POST /web/projects/pk_bench{batch.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    f"Content-Type: application/json\r\nUser-Agent: {batch.user_agent}\r\n"
                    f"Content-Length: {len(batch.body)}\r\n\r\n"
                )
                writer.write(head.encode("latin-1") + batch.body)
                response = (await reader.readuntil(b"\r\n\r\n")).lower()
                at = response.find(b"content-length:")
                await reader.readexactly(int(response[at + 15 : response.find(b"\r\n", at)]) if at >= 0 else 0)
                if response[9:12] != b"200":
                    raise RuntimeError(f"reference sender got {response[:12]!r}")
                sent += 1
        finally:
            writer.close()
        return sent

    async def main() -> tuple[float, float]:
        queue = batches[::-1]
        cpu, start = time.thread_time(), time.perf_counter()
        sent = sum(await asyncio.gather(*(worker(queue) for _ in range(connections))))
        wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
        return sent / wall, cpu / sent * 1000

    return asyncio.run(main())


async def _post_all(
    batches: list[Batch], connections: int, post: Callable[[Batch], Awaitable[None]]
) -> tuple[float, float]:
    queue = batches[::-1]

    async def worker() -> None:
        while queue:
            await post(queue.pop())

    cpu, start = time.thread_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
    return len(batches) / wall, cpu / len(batches) * 1000


def candidate(name: str, url: str, count: int, connections: int = 100) -> tuple[float, float]:
    """(requests/s, CPU ms per request) of one HTTP library posting ``count`` batches."""
    client = KoalaClient("pk_bench", api_url=url, dry_run=True)  # only to build the bodies
    batches = make_batches(client, count + 200)
    client.shutdown(timeout=0)
    base = f"{url}/web/projects/pk_bench"
    headers = {"Content-Type": "application/json", "User-Agent": "Mozilla/5.0 (bench)"}

    async def main() -> tuple[float, float]:
        post: Callable[[Batch], Awaitable[None]]
        close: Callable[[], Awaitable[None]]
        if name == "aiohttp":
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=connections, limit_per_host=0),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=5),
                auto_decompress=False,
                skip_auto_headers=("Accept", "Accept-Encoding"),
            )

            async def post(batch: Batch) -> None:
                async with session.post(base + batch.path, data=batch.body, headers=headers) as response:
                    await response.read()

            close = session.close
        elif name in ("curl", "python", "python, copy"):
            # The sender's own settings for this URL (KoalaClient holds the defaults).
            owner = KoalaClient("pk_bench", api_url=url, max_in_flight=connections)
            settings = owner._sender.settings
            owner.shutdown(timeout=0)
            engine = CurlEngine(settings) if name == "curl" else AsyncEngine(Route(settings.base_url, None), settings)

            async def post(batch: Batch) -> None:
                answer = await engine(build(base, batch))
                if answer.status != 200:
                    raise RuntimeError(f"{name} candidate got HTTP {answer.status}")

            close = engine.close
        elif name == "httpx":
            per_pool = 5
            pools = [
                httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=per_pool))
                for _ in range(connections // per_pool)
            ]
            turn = [0]

            async def post(batch: Batch) -> None:
                turn[0] += 1
                request = httpx.Request("POST", base + batch.path, content=batch.body, headers=headers)
                response = await pools[turn[0] % len(pools)].handle_async_request(request)
                await response.aread()
                await response.aclose()

            async def close() -> None:
                for pool in pools:
                    await pool.aclose()
        else:  # h11 on asyncio streams: one connection per worker, taken from a free list
            parts = urlsplit(url)
            free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, h11.Connection]] = []
            host = f"{parts.hostname}:{parts.port}"

            async def post(batch: Batch) -> None:
                if free:
                    reader, writer, conn = free.pop()
                else:
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                    conn = h11.Connection(h11.CLIENT)
                target = f"/web/projects/pk_bench{batch.path}"
                writer.write(
                    conn.send(
                        h11.Request(
                            method="POST",
                            target=target,
                            headers=[("Host", host), ("Content-Length", str(len(batch.body))), *headers.items()],
                        )
                    )
                )
                writer.write(conn.send(h11.Data(data=batch.body)))
                writer.write(conn.send(h11.EndOfMessage()))
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))
                    elif isinstance(event, h11.EndOfMessage):
                        break
                conn.start_next_cycle()
                free.append((reader, writer, conn))

            async def close() -> None:
                for _, writer, _ in free:
                    writer.close()

        await _post_all(batches[:200], connections, post)  # warm up: connections, imports
        try:
            return await _post_all(batches[200:], connections, post)
        finally:
            await close()

    return asyncio.run(main())


CANDIDATES = ["httpx", "aiohttp", "h11", "curl", "python", "python, copy"]


def run(quick: bool = False) -> list[Row]:
    rounds, count, seconds = (2, 1500, 1.0) if quick else (3, 4000, 2.0)
    configs: dict[str, dict[str, Any]] = {
        "default settings": {},
        "default settings, curl engine": {"engine": "curl"},
        # The former default: half the batches in flight (50 ms x 50 caps it at 1,000/s).
        "max_in_flight=50": {"max_in_flight": 50},
    }
    names = ["sequential", *configs, "reference", *CANDIDATES]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with CollectorProcess(delay=DELAY) as koala:
        for index in range(rounds):
            say(f"delivery: round {index + 1}/{rounds} (collector answers in {DELAY * 1000:.0f} ms)")
            results["sequential"].append(sequential(koala.url, seconds))
            for name, options in configs.items():
                results[name].append(background(koala.url, count, options))
            results["reference"].append(reference(koala.url, count))
            for name in CANDIDATES:
                results[name].append(candidate(name, koala.url, count))
    seq_rate = median([r for r, _ in results["sequential"]])
    seq_cpu = median([c for _, c in results["sequential"]])
    ref_cpu = median([c for _, c in results["reference"]])
    rows = [
        Row(
            "4",
            "sequential sender (one httpx.Client, one batch at a time)",
            f"{seq_rate:,.0f} batches/s, {seq_cpu:.2f} ms CPU/batch",
            1.0,
            "",
            None,
        )
    ]
    for name in configs:
        rate = median([r for r, _ in results[name]])
        cpu = median([c for _, c in results[name]])
        ratio = median([r / s for (r, _), (s, _) in zip(results[name], results["sequential"], strict=True)])
        if name == "default settings":
            target, met = ">= 1,000 batches/s and >= 20x", check(rate, 1000, at_most=False) and ratio >= 20
        else:  # a comparison, not a promise
            target, met = "(information)", None
        rows.append(
            Row(
                "4",
                f"background sender, {name}",
                f"{rate:,.0f} batches/s, {cpu:.2f} ms sender CPU/batch",
                ratio,
                target,
                met,
            )
        )
        if name == "default settings":
            rows.append(
                Row(
                    "4",
                    "background sender: sender CPU per batch",
                    f"{cpu:.3f} ms",
                    cpu / ref_cpu,
                    "<= 2.0x the yardstick, at >= 1,800 batches/s",
                    cpu / ref_cpu <= 2.0 and rate >= 1800,
                )
            )
    rate = median([r for r, _ in results["reference"]])
    ratio = median([r / s for (r, _), (s, _) in zip(results["reference"], results["sequential"], strict=True)])
    rows.append(
        Row(
            "4",
            "yardstick: bare asyncio HTTP/1.1 sender, 100 connections (bench only)",
            f"{rate:,.0f} batches/s, {ref_cpu:.3f} ms CPU/batch",
            ratio,
            "(information)",
            None,
        )
    )
    for name in CANDIDATES:
        rate = median([r for r, _ in results[name]])
        cpu = median([c for _, c in results[name]])
        rows.append(
            Row(
                "4",
                f"candidate HTTP layer alone: {name}, 100 in flight",
                f"{rate:,.0f} requests/s, {cpu:.3f} ms CPU/request",
                cpu / ref_cpu,
                "(information; ratio: CPU to the yardstick)",
                None,
            )
        )
    return rows
