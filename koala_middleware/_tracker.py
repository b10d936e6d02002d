"""What a handler records about one visitor, and about the accounts it touches.

A ``Tracker`` only records: it validates each call where it is made, keeps the encoded items,
and turns them into batches when its owner (a middleware, or the ``with`` block of
``KoalaClient.tracker()``) hands it over. It never does I/O.
"""

from __future__ import annotations

import contextvars
import datetime
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import _protocol
from ._encoding import format_sent_at
from ._ids import random_uuid4
from ._validate import check_domain, check_email, check_id, check_name, encode_mapping

if TYPE_CHECKING:
    from ._client import KoalaClient

MAX_ITEMS_PER_TRACKER = 10_000

_current: contextvars.ContextVar[Tracker | None] = contextvars.ContextVar(
    "koala_tracker", default=None
)


def current_tracker() -> Tracker | None:
    """The tracker of the request being handled, or ``None`` outside one.

    For code deep in a call stack that has no request object. Works in sync handlers that
    FastAPI runs in its thread pool, since those inherit the request's context.
    """
    return _current.get()


class _Recorder:
    __slots__ = ("_event_ids", "_events", "_identifies")

    def __init__(self) -> None:
        self._events: list[str] = []
        self._event_ids: list[str] = []
        self._identifies: list[str] = []

    def track(
        self,
        event: str,
        properties: Mapping[str, Any] | None = None,
        *,
        message_id: str | None = None,
        sent_at: datetime.datetime | None = None,
    ) -> str:
        """Record an event (the person's, or the account's); returns its ``message_id``.

        ``message_id`` is Koala's idempotency key: a UUID unless you pass your own.
        """
        check_name(event)
        properties_json = encode_mapping(properties, "properties")
        message_id = random_uuid4() if message_id is None else check_id(message_id, "message_id")
        item = _protocol.event_item(message_id, event, properties_json, format_sent_at(sent_at))
        if self._room():
            self._events.append(item)
            self._event_ids.append(message_id)
        return message_id

    def _room(self) -> bool:
        raise NotImplementedError

    def _has_items(self) -> bool:
        return bool(self._events or self._identifies)


class AccountRecorder(_Recorder):
    """Records traits and events of one account (company), sent to ``/accounts/batch``."""

    __slots__ = ("_tracker", "domain")

    def __init__(self, tracker: Tracker, domain: str) -> None:
        super().__init__()
        self._tracker = tracker
        self.domain = domain

    def _room(self) -> bool:
        return self._tracker._room()

    def identify(self, traits: Mapping[str, Any] | None = None, *, group_id: str | None = None) -> None:
        """Record account traits; ``group_id`` separates tenants/workspaces of one company."""
        if group_id is not None:
            check_id(group_id, "group_id")
            traits = {**(traits or {}), "group_id": group_id}
        item = _protocol.account_identify_item(encode_mapping(traits, "traits"))
        if self._room():
            self._identifies.append(item)

    def _batches(self, user_agent: str) -> list[_protocol.Batch]:
        return _protocol.account_batches(self.domain, self._events, self._event_ids, self._identifies, user_agent)


class Tracker(_Recorder):
    """Everything recorded about one person (``profile_id`` and/or ``email``).

    In a web request the middleware makes it: ``profile_id`` is the visitor's ``ko_id``
    cookie and the batch carries the visitor's User-Agent and IP. Elsewhere, use
    ``with client.tracker(email=...) as tracker:``, which sends on exit.
    """

    __slots__ = (
        "_accounts",
        "_client",
        "_count",
        "_ip",
        "_read_visitor",
        "_request",
        "_user_agent",
        "email",
        "enabled",
        "profile_id",
    )

    _read_visitor: Callable[[Any], tuple[str | None, str | None]]  # set by RequestTracker

    def __init__(
        self,
        client: KoalaClient,
        profile_id: str | None = None,
        email: str | None = None,
        user_agent: str | None = None,
        ip: str | None = None,
        enabled: bool = True,
    ) -> None:
        # The record lists come with the first record (see _room); _Recorder.__init__ is
        # not called. RequestTracker sets these same fields its own way.
        self._client = client
        self.profile_id = profile_id
        self.email = email
        self._user_agent = user_agent
        self._ip = ip
        #: False when the visitor opted out (GPC, consent): calls are validated, then ignored.
        self.enabled = enabled
        self._accounts: dict[str, AccountRecorder] | None = None
        self._count = 0
        self._request: Any = None  # see RequestTracker

    @property
    def user_agent(self) -> str | None:
        """The visitor's User-Agent, sent with the batch (None: the client's)."""
        if self._request is not None:
            self._read_request()
        return getattr(self, "_user_agent", None)  # unset: released unread (see RequestTracker)

    @user_agent.setter
    def user_agent(self, value: str | None) -> None:
        if self._request is not None:
            self._read_request()
        self._user_agent = value

    @property
    def ip(self) -> str | None:
        """The visitor's IP address, sent with the batch (unless ``send_ip=False``)."""
        if self._request is not None:
            self._read_request()
        return getattr(self, "_ip", None)

    @ip.setter
    def ip(self, value: str | None) -> None:
        if self._request is not None:
            self._read_request()
        self._ip = value

    def _read_request(self) -> None:
        self._user_agent, self._ip = self._read_visitor(self._request)
        self._request = None

    def __repr__(self) -> str:
        return f"<Tracker profile_id={self.profile_id!r} enabled={self.enabled}>"

    def identify(self, email: str | None = None, traits: Mapping[str, Any] | None = None) -> None:
        """Tie this visitor to ``email`` (and/or record person traits)."""
        if email is not None:
            email = check_email(email)
            traits = {**(traits or {}), "email": email}
        elif self.email is not None and traits is not None and "email" not in traits:
            traits = {**traits, "email": self.email}
        item = _protocol.visitor_identify_item(encode_mapping(traits, "traits"), format_sent_at(None))
        if self._room():
            if email is not None:
                self.email = email
            self._identifies.append(item)

    def account(
        self, domain: str, traits: Mapping[str, Any] | None = None, *, group_id: str | None = None
    ) -> AccountRecorder:
        """Record traits of the account at ``domain``; returns a recorder for its events."""
        domain = check_domain(domain)
        accounts = self._accounts
        if accounts is None:
            accounts = self._accounts = {}
        recorder = accounts.get(domain)
        if recorder is None:
            recorder = accounts[domain] = AccountRecorder(self, domain)
        if traits is not None or group_id is not None:
            recorder.identify(traits, group_id=group_id)
        return recorder

    def _room(self) -> bool:
        """Count an item in; False (and counted as dropped) when it must not be kept."""
        if not self.enabled:
            return False
        count = self._count
        if not count:
            self._events = []
            self._event_ids = []
            self._identifies = []
        elif count >= MAX_ITEMS_PER_TRACKER:
            self._client._drop_items(1, "tracker_full")
            return False
        self._count = count + 1
        return True

    def batches(self) -> list[_protocol.Batch]:
        """The requests this tracker's records make (empty when nothing was recorded)."""
        if not self._count:
            return []
        client = self._client
        user_agent = self.user_agent or client.user_agent
        if self._has_items():
            result = _protocol.visitor_batches(
                self.profile_id,
                self.email,
                self.ip if client.send_ip else None,
                self._events,
                self._event_ids,
                self._identifies,
                user_agent,
            )
        else:
            result = []
        if self._accounts:
            for recorder in self._accounts.values():
                if recorder._has_items():
                    result.extend(recorder._batches(user_agent))
        return result

    def send(self) -> None:
        """Hand what was recorded to the client (non-blocking) and start afresh."""
        self._client.send_tracker(self)

    def _reset(self) -> None:
        self._accounts = None
        self._count = 0  # the next record makes fresh lists

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.send()


#: ``bind(tracker) -> token`` makes ``tracker`` ``current_tracker()``; ``unbind(token)`` undoes
#: it. The context variable's own methods, not wrappers: they run several times per request.
bind: Callable[[Tracker | None], contextvars.Token[Tracker | None]] = _current.set
unbind: Callable[[contextvars.Token[Tracker | None]], None] = _current.reset


class RequestTracker(Tracker):
    """The middlewares' tracker: made on every request, most never used, so it is made with
    the least work: the visitor's User-Agent and IP are read from the request only when the
    batch (or your code) needs them. The middleware releases the request when it is done
    (``_request = None``): the request holds the tracker too, and a cycle per request would
    leave every request's objects to the garbage collector. After that, unread fields are None.

    :param request: the WSGI ``environ`` or ASGI ``scope``.
    :param read_visitor: ``read_visitor(request) -> (user_agent, ip)``.
    """

    __slots__ = ()

    def __init__(
        self,
        client: KoalaClient,
        profile_id: str | None,
        enabled: bool,
        request: Any,
        read_visitor: Callable[[Any], tuple[str | None, str | None]],
    ) -> None:
        self._client = client
        self.profile_id = profile_id
        self.email = None
        self.enabled = enabled
        self._accounts = None
        self._count = 0
        self._request = request
        self._read_visitor = read_visitor
