"""Part 1, "Starlette, identify + track", taken apart in place: where koala's extra time goes.

Each variant is the same Starlette app and request as part 1's identify + track case, with
one step of koala's hand-over replaced by nothing (or by a constant), so that the
difference to the full middleware is that step's cost *inside a request* (isolated timings
of the same steps read 3-4 times less). Same method as ``bench.inproc``: process CPU time,
gc off, short chunks interleaved (the order shuffled every round), medians of the per-round
differences to the bare app; two identical koala apps show the noise.

    python -m bench.handover            # the figures of bench/README.md ("taken apart in place")
    python -m bench.handover --rounds 11

The floor (``bench/floor.py``) is taken apart the same way once: with its hand-over a
no-op, the difference is what its own hand-over (one body built, one append under a lock)
costs in place, the yardstick for koala's. Two more variants time a design that was not
kept, so its figure can be checked again: the usual hand-over fused into one function
(the body's f-string and the queue's admission written a second time).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import importlib.util
import logging
import random
import types
from collections.abc import Callable
from typing import Any

from starlette.middleware import Middleware

import koala_middleware
from koala_middleware import _tracker
from koala_middleware._delivery._queue import ASCII_STR_HEADER, BATCH_OVERHEAD
from koala_middleware._encoding import quote
from koala_middleware._protocol import Batch
from koala_middleware.asgi import KoalaASGIMiddleware

from . import floor
from .common import median
from .inproc import (
    USER_AGENT,
    VISITOR_ID,
    _stopper,
    asgi_response_headers,
    asgi_runner,
    asgi_scope,
    parked_client,
    starlette_app,
)

COOKIE = f"ko_id={VISITOR_ID}; ko_id_server={VISITOR_ID}; _ga=GA1.2.1234567890.1700000000"
PATH = "/track"
REQUESTS_PER_CHUNK = 400

Patch = Callable[[Any, KoalaASGIMiddleware], None]


def _no_hand_over(client: Any, middleware: KoalaASGIMiddleware) -> None:
    client._send_tracker = lambda tracker: None  # the records are dropped


def _no_submit(client: Any, middleware: KoalaASGIMiddleware) -> None:
    client._sender.submit = lambda batch: True  # built, then dropped


def _kept_in_a_deque(client: Any, middleware: KoalaASGIMiddleware) -> None:
    client._sender.submit = collections.deque().append  # built and kept, no bounds or counters


def _lock_and_append(client: Any, middleware: KoalaASGIMiddleware) -> None:
    queue = client._sender._queue
    kept: collections.deque[Batch] = collections.deque()

    def submit(batch: Batch) -> bool:  # the queue's lock, then an append: no bounds, no counters
        with queue.lock:
            kept.append(batch)
        return True

    client._sender.submit = submit


def _lock_and_admission(client: Any, middleware: KoalaASGIMiddleware) -> None:
    queue = client._sender._queue

    def submit(batch: Batch) -> bool:  # the queue's lock and admission (its bounds), no counters
        with queue.lock:
            queue.admit_locked(batch)
        return True

    client._sender.submit = submit


def _body_as_the_floor_builds_it(client: Any, middleware: KoalaASGIMiddleware) -> None:
    def send_tracker(tracker: Any) -> None:  # floor.py's hand-over on koala's tracker, nothing queued
        with _tracker._lock:
            events, identifies = tracker._events, tracker._identifies
            tracker._count = 0
        scope = tracker._request
        user_agent = ""
        for name, value in scope["headers"]:
            if name == b"user-agent":
                user_agent = value.decode("latin-1")
        body = (
            f'{{"profile_id":{quote(tracker.profile_id)},"ip":{quote(scope["client"][0])},'
            f'"events":[{",".join(events)}],"identifies":[{",".join(identifies)}]}}'
        ).encode()
        Batch("/batch", body, user_agent, None, len(events))

    client._send_tracker = send_tracker


def _user_agent_and_ip_given(client: Any, middleware: KoalaASGIMiddleware) -> None:
    visitor = (USER_AGENT, "203.0.113.7")
    middleware.visits.read_visitor = lambda request: visitor  # nothing read from the scope


def _fused_hand_over(read_inline: bool) -> Patch:
    """Koala's usual hand-over in one function (not kept: see bench/README.md, "a fused
    hand-over, re-measured"): the lists taken under the lock, the User-Agent and IP read
    (through the ASGI reader, or ``read_inline`` as the floor reads them, unchecked), the
    body's f-string, the batch and the queue's admission inline (``cost()`` written out as
    for a short ASCII User-Agent, the bench's); no rare case handled."""

    def patch(client: Any, middleware: KoalaASGIMiddleware) -> None:
        sender = client._sender
        queue = sender._queue

        def send_tracker(tracker: Any) -> None:
            with _tracker._lock:
                events, identifies = tracker._events, tracker._identifies
                profile_id, email = tracker.profile_id, tracker.email
                tracker._count = 0
            if read_inline:
                scope = tracker._request
                user_agent = None
                for name, value in scope["headers"]:
                    if name == b"user-agent":
                        user_agent = value.decode("latin-1")
                ip = scope["client"][0]
            else:
                tracker._read_request()
                user_agent, ip = tracker._user_agent, tracker._ip
            head = '"profile_id":' + quote(profile_id)
            if email is not None:
                head += ',"email":' + quote(email)
            if ip and client.send_ip:
                head += ',"ip":' + quote(ip)
            body = f'{{{head},"events":[{",".join(events)}],"identifies":[{",".join(identifies)}]}}'.encode()
            user_agent = user_agent or client.user_agent
            batch = Batch("/batch", body, user_agent, None, len(events))
            size = len(body) + len(user_agent) + BATCH_OVERHEAD + ASCII_STR_HEADER
            with queue.lock:
                admitted = not (
                    queue.closed
                    or queue.pending >= queue._max_batches
                    or queue.pending_bytes + size > queue._max_bytes
                    or sender._thread is None
                    or sender._loop_idle
                )
                if admitted:
                    queue.waiting.append(batch)
                    queue.pending += 1
                    queue.pending_bytes += size
                    sender.counters._stats.enqueued += 1
            if not admitted:
                sender.submit(batch)  # the general path: start or wake the sender, refuse

        client._send_tracker = send_tracker

    return patch


VARIANTS: dict[str, Patch | None] = {
    "koala": None,
    "koala (identical copy)": None,
    "koala, User-Agent and IP given": _user_agent_and_ip_given,
    "koala, submit: the queue's lock and admission": _lock_and_admission,
    "koala, submit: the queue's lock and an append": _lock_and_append,
    "koala, batches kept in a deque": _kept_in_a_deque,
    "koala, batches built, not submitted": _no_submit,
    "koala, the batch built as the floor builds it, not submitted": _body_as_the_floor_builds_it,
    "koala, no hand-over": _no_hand_over,
    "koala, one fused hand-over (not kept)": _fused_hand_over(read_inline=False),
    "koala, one fused hand-over, visitor read as the floor reads it (not kept)": _fused_hand_over(read_inline=True),
}


def _floor_without_its_hand_over() -> types.ModuleType:
    """A second copy of ``bench/floor.py`` whose hand-over does nothing (the User-Agent and
    IP are still read): a copy, so that the floor itself stays exactly as part 1 times it."""
    spec = importlib.util.spec_from_file_location("bench.floor_without_hand_over", floor.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._Visit.hand_over = lambda self, user_agent, ip: None
    return module


def _koala(
    loop: asyncio.AbstractEventLoop, patch: Patch | None, stoppers: list[Callable[[], None]]
) -> Callable[[int], int]:
    client, koala = parked_client(types.SimpleNamespace(package=koala_middleware))
    stoppers.append(_stopper(client, koala))
    app = starlette_app(koala_middleware.current_tracker, [Middleware(KoalaASGIMiddleware, client=client)])
    scope = asgi_scope(PATH, COOKIE)
    asgi_response_headers(app, scope, loop)  # builds the middleware stack
    if patch is not None:
        middleware = app.middleware_stack
        while not isinstance(middleware, KoalaASGIMiddleware):
            middleware = middleware.app  # type: ignore[union-attr]
        patch(client, middleware)
    return asgi_runner(app, scope, loop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args()
    logging.getLogger("koala_middleware").setLevel(logging.ERROR)  # the parked batches dropped at the end
    loop = asyncio.new_event_loop()
    stoppers: list[Callable[[], None]] = []
    runners: dict[str, Callable[[int], int]] = {
        "bare": asgi_runner(starlette_app(koala_middleware.current_tracker), asgi_scope(PATH, COOKIE), loop),
        "floor: the same duties, nothing else": asgi_runner(
            starlette_app(floor.current, [Middleware(floor.FloorASGIMiddleware)]), asgi_scope(PATH, COOKIE), loop
        ),
    }
    no_hand_over = _floor_without_its_hand_over()
    runners["floor, its hand-over a no-op"] = asgi_runner(
        starlette_app(no_hand_over.current, [Middleware(no_hand_over.FloorASGIMiddleware)]),
        asgi_scope(PATH, COOKIE),
        loop,
    )
    runners.update({name: _koala(loop, patch, stoppers) for name, patch in VARIANTS.items()})
    extra: dict[str, list[float]] = {name: [] for name in runners}
    bare: list[float] = []
    order = list(runners.items())
    gc.disable()
    try:
        for _ in range(args.rounds):
            random.shuffle(order)
            times = {name: run(REQUESTS_PER_CHUNK) / REQUESTS_PER_CHUNK for name, run in order}
            bare.append(times["bare"])
            for name, ns in times.items():
                extra[name].append(ns - times["bare"])
    finally:
        gc.enable()
        for stop in stoppers:
            stop()
    print(f"| variant | over the bare app ({median(bare) / 1000:.2f} us a request) |")
    print("| --- | ---: |")
    for name, values in extra.items():
        if name != "bare":
            print(f"| {name} | +{median(values) / 1000:.2f} us |")


if __name__ == "__main__":
    main()
