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

For "identify + track", the object records as koala's tracker must: each call checked and
encoded at the call site (the email's pattern, the name, the JSON of the traits and
properties), a time stamp and, for an event, a message id, appended under a lock (records
may come from threads); after the response one body is built (the visitor's id, IP and
User-Agent read from the request) and appended to a queue under its lock. It uses koala's
own cheapest primitives for each (its C JSON encoder, id pool, time stamp cache and email
memo): the floor is the duties' cost, not a slower rewrite of them.
"""

from __future__ import annotations

import collections
import contextvars
import itertools
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any

from koala_middleware._encoding import dumps, now_sent_at, quote
from koala_middleware._ids import random_uuid4
from koala_middleware._validate import check_email

_current: contextvars.ContextVar[Any] = contextvars.ContextVar("floor_visit", default=None)
_seen: dict[int, str] = {}
_VISITOR_ID = "0f8fad5b-d9cb-4980-b0f2-4b2a1c6f5d3e"  # what a first read of the header finds

_lock = threading.Lock()
_queue_lock = threading.Lock()
_queue: collections.deque[tuple[bytes, str]] = collections.deque(maxlen=100_000)  # a bounded queue

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


class _Visit:
    __slots__ = ("count", "events", "identifies", "request", "respond", "started", "visitor_id")

    events: list[str]
    identifies: list[str]

    def __init__(self, visitor_id: str, request: Any, respond: Any) -> None:
        self.visitor_id = visitor_id
        self.request = request
        self.respond = respond
        self.started = False
        self.count = 0

    def identify(self, email: str, traits: dict[str, Any]) -> None:
        email = check_email(email)
        item = f'{{"type":"identify","sent_at":"{now_sent_at()}","traits":{dumps({**traits, "email": email})}}}'
        with _lock:
            if not self.count:
                self.events, self.identifies = [], []
            self.count += 1
            self.identifies.append(item)

    def track(self, event: str, properties: dict[str, Any]) -> str:
        if not isinstance(event, str) or not event or len(event) > 200:
            raise ValueError(event)
        message_id = random_uuid4()
        item = (
            f'{{"message_id":"{message_id}","type":"track","event":{quote(event)},'
            f'"properties":{dumps(properties)},"sent_at":"{now_sent_at()}"}}'
        )
        with _lock:
            if not self.count:
                self.events, self.identifies = [], []
            self.count += 1
            self.events.append(item)
        return message_id

    def hand_over(self, user_agent: str, ip: str) -> None:
        with _lock:
            events, identifies = self.events, self.identifies
            self.count = 0
        body = (
            f'{{"profile_id":{quote(self.visitor_id)},"ip":{quote(ip)},"events":[{",".join(events)}],'
            f'"identifies":[{",".join(identifies)}]}}'
        ).encode()
        with _queue_lock:
            _queue.append((body, user_agent))

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
                user_agent = ""
                for name, value in scope["headers"]:
                    if name == b"user-agent":
                        user_agent = value.decode("latin-1")
                visit.hand_over(user_agent, scope["client"][0])
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
            environ = visit.request
            visit.hand_over(environ.get("HTTP_USER_AGENT", ""), environ["REMOTE_ADDR"])
        visit.request = visit.respond = None


def current() -> Any:
    """The request's object (the bench app's ``current_tracker()``)."""
    return _current.get()
