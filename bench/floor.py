"""Part 1's floor: the least a middleware with koala's per-request duties can cost.

Issue 22 set the returning-visitor targets at "the floor": what a middleware must do on
every request to keep koala's documented behaviour, and nothing else. These two
middlewares do exactly that, written for speed and for no other purpose (no options, no
rules, no odd-input handling, no hand-over; not a product), so part 1 can time them beside
koala in the same run:

- read the Cookie (and Sec-GPC) header and look the visitor id up in a dict of the headers
  seen before (koala's memo of ``ko_id``);
- make one object per request and keep it where the app finds it (``scope``/``environ``,
  Starlette's ``request.state``) and bind it to a context variable (``current_tracker()``);
- wrap ``send``/``start_response`` in a method of that object that passes every message on
  (``reset()`` needs the wrapper on every response to add its ``Set-Cookie``);
- at the end, unbind it, check whether anything was recorded and let go of the request;
  WSGI: run the app, each chunk and ``close()`` in a copy of the server's context, as koala
  does (an unclosed response leaks nothing into the server's thread).
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any

_current: contextvars.ContextVar[Any] = contextvars.ContextVar("floor_visit", default=None)
_seen: dict[int, str] = {}
_VISITOR_ID = "0f8fad5b-d9cb-4980-b0f2-4b2a1c6f5d3e"  # what a first read of the header finds

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


class _Visit:
    __slots__ = ("count", "request", "respond", "started", "visitor_id")

    def __init__(self, visitor_id: str, request: Any, respond: Any) -> None:
        self.visitor_id = visitor_id
        self.request = request
        self.respond = respond
        self.started = False
        self.count = 0

    def send(self, message: Message) -> Awaitable[None]:
        if not self.started and message["type"] == "http.response.start":
            self.started = True
        return self.respond(message)  # type: ignore[no-any-return]

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.started = True
        return self.respond(status, headers, exc_info)


def _visitor_id(cookie: object) -> str:
    key = hash(cookie)
    found = _seen.get(key)
    if found is None:
        found = _seen[key] = _VISITOR_ID
    return found


class FloorASGIMiddleware:
    def __init__(self, app: Any, **_: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cookie = None
        gpc = False
        for name, value in scope["headers"]:
            if name == b"cookie":
                cookie = value if cookie is None else cookie + b"; " + value
            elif name == b"sec-gpc":
                gpc = gpc or value == b"1"
        visit = scope["koala.tracker"] = _Visit(_visitor_id(cookie), scope, send)
        scope["state"]["koala"] = visit
        token = _current.set(visit)
        try:
            await self.app(scope, receive, visit.send)
        finally:
            _current.reset(token)
            if visit.count:
                pass  # a hand-over would go here
            visit.request = visit.respond = None


class FloorWSGIMiddleware:
    def __init__(self, app: Any, **_: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        visit = environ["koala.tracker"] = _Visit(_visitor_id(environ.get("HTTP_COOKIE")), environ, start_response)
        context = contextvars.copy_context()
        context.run(_current.set, visit)
        iterable = context.run(self.app, environ, visit.start_response)
        return _Response(iterable, context, visit)


class _Response:
    __slots__ = ("_context", "_iterable", "_visit")

    def __init__(self, iterable: Iterable[bytes], context: contextvars.Context, visit: _Visit) -> None:
        self._iterable = iterable
        self._context = context
        self._visit = visit

    def __iter__(self) -> Iterator[bytes]:
        return map(self._context.run, itertools.repeat(iter(self._iterable).__next__))

    def close(self) -> None:
        close = getattr(self._iterable, "close", None)
        if close is not None:
            self._context.run(close)
        visit = self._visit
        if visit.count:
            pass  # a hand-over would go here
        visit.request = visit.respond = None
