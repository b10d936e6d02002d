"""What a handler records about one visitor, and about the accounts it touches.

A ``Tracker`` only records: it validates each call where it is made, keeps the encoded items,
and turns them into batches when its owner (a middleware, or the ``with`` block of
``KoalaClient.tracker()``) hands it over. It never does I/O.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from . import _protocol
from ._cookie import may_set_cookie
from ._encoding import format_sent_at, now_sent_at, quote
from ._ids import random_uuid4
from ._validate import MAX_NAME_LENGTH, check_domain, check_email, check_id, check_name, encode_mapping

if TYPE_CHECKING:
    from ._delivery import DropReason

MAX_ITEMS_PER_TRACKER = 10_000

logger = logging.getLogger("koala_middleware")
LOG_FOLLOW_UP = (
    "a request's tracker recorded after its request was handed over (a kept reference, a "
    "thread or a task); each such call is sent as a follow-up batch (logged once)"
)
LOG_FOLLOW_UP_FAILED = "could not hand a follow-up batch to the sender; it is lost"
LOG_HANDOVER_FAILED = "could not hand the request's batch to the sender; it is lost"
TRACKER_FULL_DETAIL = (
    f"a tracker keeps at most {MAX_ITEMS_PER_TRACKER} items (events, identifies, account() calls) "
    "until it is handed over; record less per request, or call tracker.send() in between"
)
COOKIE_WITHHELD_DETAIL = (
    "a new visitor's cookie was not set (a response a shared cache may store, a 304, or no "
    "response) and no email was identified: no browser holds the id, so nothing is sent"
)

#: A request tracker's stages: the handler runs; the response started (its headers are out);
#: the middleware handed the tracker over (later records are sent as follow-up batches).
OPEN, STARTED, HANDED_OVER = 0, 1, 2

# Orders records and hand-overs: a thread or task started by a handler may record while the
# middleware hands its tracker over, and neither may lose the other's items. Held for list
# appends and for building batches only (no I/O); uncontended, it costs ~0.1 us a record.
_lock = threading.Lock()


def _new_lock_in_child() -> None:
    """A forked child gets a fresh lock: another thread may have held it at the fork."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)

_current: contextvars.ContextVar[Tracker | None] = contextvars.ContextVar("koala_tracker", default=None)
_logged_follow_up = False
_UNREAD: Any = object()  # a request tracker's User-Agent and IP before they are read


class Sink(Protocol):
    """Where a tracker's records go (the :class:`~koala_middleware.KoalaClient`), as far as
    the tracker needs to know: recording and sending change apart."""

    @property
    def user_agent(self) -> str:
        """The User-Agent of batches with no visitor's own."""

    @property
    def send_ip(self) -> bool:
        """Whether batches carry the visitor's IP."""

    def _send_tracker(self, tracker: Tracker) -> None:
        """Take what ``tracker`` recorded (its ``_take()``) for delivery."""

    def _count_dropped(self, items: int, reason: DropReason, detail: str = "") -> None:
        """Count (and log) ``items`` recorded but never sent, and why."""


class RequestRules(Protocol):
    """What a request's tracker asks of its middleware's rules, about its request."""

    def read_visitor(self, request: Any) -> tuple[str | None, str | None]:
        """``(user_agent, ip)`` of the request."""

    def new_visitor(self, request: Any) -> tuple[str, list[str]]:
        """A fresh visitor id and the ``Set-Cookie`` values that give it to the browser."""


def current_tracker() -> Tracker | None:
    """The tracker of the request being handled, or ``None`` outside one.

    For code deep in a call stack that has no request object. Works in sync handlers that
    FastAPI runs in its thread pool, since those inherit the request's context.
    """
    return _current.get()


def _event_item(
    event: str, properties: Mapping[str, Any] | None, message_id: str | None, sent_at: datetime.datetime | None
) -> tuple[str, str]:
    """An event's encoded item and its ``message_id``, checked at the call site.

    The usual name is checked without calling check_name, and an id made here is quoted
    without ``quote()`` (micro, interleaved: a track() 1.64 -> 1.56 us).
    """
    if event.__class__ is not str or not 0 < len(event) <= MAX_NAME_LENGTH or event.isspace():
        check_name(event)  # says what is wrong (the test above is its fast path, one per track())
    properties_json = encode_mapping(properties, "properties")
    if message_id is None:
        message_id = random_uuid4()
        quoted_id = f'"{message_id}"'  # hex digits and dashes: nothing to escape
    else:
        quoted_id = quote(check_id(message_id, "message_id"))
    stamp = now_sent_at() if sent_at is None else format_sent_at(sent_at)
    return _protocol.event_item(quoted_id, event, properties_json, stamp), message_id


def _account_identify_item(traits: Mapping[str, Any] | None, group_id: str | None) -> str:
    if group_id is not None:
        check_id(group_id, "group_id")
        traits = {**(traits or {}), "group_id": group_id}
    return _protocol.account_identify_item(encode_mapping(traits, "traits"))


class _AccountRecords:
    """What one tracker recorded about one account since its last hand-over."""

    __slots__ = ("events", "identifies")

    def __init__(self) -> None:
        self.events: list[str] = []
        self.identifies: list[str] = []


class AccountRecorder:
    """Records traits and events of one account (company), sent to ``/accounts/batch``.

    A handle on its tracker's records: what it records counts against the tracker's item
    limit and is handed over with the tracker (also when kept and used after that).
    """

    __slots__ = ("_tracker", "domain")

    def __init__(self, tracker: Tracker, domain: str) -> None:
        self._tracker = tracker
        self.domain = domain

    def track(
        self,
        event: str,
        properties: Mapping[str, Any] | None = None,
        *,
        message_id: str | None = None,
        sent_at: datetime.datetime | None = None,
    ) -> str:
        """Record an event of the account; returns its ``message_id`` (Koala's idempotency
        key: a UUID unless you pass your own)."""
        item, message_id = _event_item(event, properties, message_id, sent_at)
        tracker = self._tracker
        with _lock:
            records = tracker._account_records(self.domain)
            if records is not None:
                records.events.append(item)
        if tracker._stage == HANDED_OVER:
            tracker._follow_up()
        return message_id

    def identify(self, traits: Mapping[str, Any] | None = None, *, group_id: str | None = None) -> None:
        """Record account traits; ``group_id`` separates tenants/workspaces of one company."""
        item = _account_identify_item(traits, group_id)
        tracker = self._tracker
        with _lock:
            records = tracker._account_records(self.domain)
            if records is not None:
                records.identifies.append(item)
        if tracker._stage == HANDED_OVER:
            tracker._follow_up()

    def __repr__(self) -> str:
        return f"<AccountRecorder domain={self.domain!r}>"


class Tracker:
    """Everything recorded about one person (``profile_id`` and/or ``email``).

    In a web request the middleware makes it: ``profile_id`` is the visitor's ``ko_id``
    cookie and the batch carries the visitor's User-Agent and IP. Elsewhere, use
    ``with client.tracker(email=...) as tracker:``, which sends on exit.

    Thread-safe: records from several threads (or tasks) are kept in order of arrival.
    """

    __slots__ = (
        "_accounts",
        "_client",
        "_count",
        "_events",
        "_fresh",
        "_identifies",
        "_ip",
        "_pending",
        "_stage",
        "_user_agent",
        "email",
        "enabled",
        "profile_id",
    )

    _events: list[str]
    _identifies: list[str]
    #: Batches made by ``reset()`` from the records before it, handed over with the rest.
    _pending: list[_protocol.Batch] | None

    def __init__(
        self,
        client: Sink,
        profile_id: str | None = None,
        email: str | None = None,
        user_agent: str | None = None,
        ip: str | None = None,
        enabled: bool = True,
    ) -> None:
        # The record lists come with the first record (see _room).
        self._client = client
        self.profile_id = profile_id
        self.email = email
        self._user_agent = user_agent
        self._ip = ip
        #: False when the visitor opted out (GPC, consent): calls are validated, then ignored.
        self.enabled = enabled
        self._accounts: dict[str, _AccountRecords] | None = None
        self._count = 0
        self._stage = OPEN
        self._pending = None
        #: True while ``profile_id`` is an id made for this request whose cookie has not gone
        #: out: no browser holds it, so it must not reach Koala (see ``_build``).
        self._fresh = False

    @property
    def user_agent(self) -> str | None:
        """The visitor's User-Agent, sent with the batch (None: the client's)."""
        return self._user_agent

    @user_agent.setter
    def user_agent(self, value: str | None) -> None:
        self._user_agent = value

    @property
    def ip(self) -> str | None:
        """The visitor's IP address, sent with the batch (unless ``send_ip=False``)."""
        return self._ip

    @ip.setter
    def ip(self, value: str | None) -> None:
        self._ip = value

    def __repr__(self) -> str:
        return f"<Tracker profile_id={self.profile_id!r} enabled={self.enabled}>"

    def _read_request(self) -> None:
        """Fill in the User-Agent and IP not read yet (a request tracker reads them from its
        request when first needed; this one is given them)."""

    def track(
        self,
        event: str,
        properties: Mapping[str, Any] | None = None,
        *,
        message_id: str | None = None,
        sent_at: datetime.datetime | None = None,
    ) -> str:
        """Record an event of this person; returns its ``message_id``.

        ``message_id`` is Koala's idempotency key: a UUID unless you pass your own.
        """
        item, message_id = _event_item(event, properties, message_id, sent_at)
        with _lock:
            if self._room():
                self._events.append(item)
        if self._stage == HANDED_OVER:
            self._follow_up()
        return message_id

    def identify(self, email: str | None = None, traits: Mapping[str, Any] | None = None) -> None:
        """Tie this visitor to ``email`` (and/or record person traits)."""
        if email is not None:
            email = check_email(email)
            traits = {**(traits or {}), "email": email}
        elif self.email is not None and traits is not None and "email" not in traits:
            traits = {**traits, "email": self.email}
        item = _protocol.visitor_identify_item(encode_mapping(traits, "traits"), now_sent_at())
        with _lock:
            if self._room():
                if email is not None:
                    self.email = email
                self._identifies.append(item)
        if self._stage == HANDED_OVER:
            self._follow_up()

    def account(
        self,
        domain: str,
        traits: Mapping[str, Any] | None = None,
        *,
        group_id: str | None = None,
        link: bool = True,
    ) -> AccountRecorder:
        """Record traits of the account at ``domain``; returns a recorder for its events.

        ``traits`` (and ``group_id``) go to ``/accounts/batch``. With ``link`` (the
        default), this person is also linked to the company, as Koala's browser SDK does it:
        an identify whose traits hold ``"$account": {"domain": ..., "group_id": ...,
        <traits>}``, one per call. Pass ``link=False`` to record about an account without
        tying this person to it (a back-office job syncing many companies).
        """
        domain = check_domain(domain)
        account_item = None
        if traits is not None or group_id is not None:
            account_item = _account_identify_item(traits, group_id)
        link_item = None
        if link:
            link_traits: dict[str, Any] = {"$account": self._account_link(domain, traits, group_id)}
            if self.email is not None:
                link_traits["email"] = self.email
            link_item = _protocol.visitor_identify_item(encode_mapping(link_traits, "traits"), now_sent_at())
        if account_item is not None or link_item is not None:
            with _lock:
                if link_item is not None and self._room():
                    self._identifies.append(link_item)
                if account_item is not None:
                    records = self._account_records(domain)
                    if records is not None:
                        records.identifies.append(account_item)
            if self._stage == HANDED_OVER:
                self._follow_up()
        return AccountRecorder(self, domain)

    @staticmethod
    def _account_link(domain: str, traits: Mapping[str, Any] | None, group_id: str | None) -> dict[str, Any]:
        """``$account`` as Koala's browser SDK writes it: domain, group_id, then the traits
        (whose own ``domain``/``group_id`` cannot redirect the link)."""
        link: dict[str, Any] = {"domain": domain}
        if group_id is not None:
            link["group_id"] = group_id
        if traits:
            link.update(traits)
            link["domain"] = domain
            if group_id is not None:
                link["group_id"] = group_id
        return link

    def reset(self) -> None:
        """Forget who this visitor is (at logout): only in a web request (see RequestTracker)."""
        if self.enabled:
            raise RuntimeError(
                "reset() works on a web request's tracker: it sets a new ko_id cookie on the "
                "response. Outside a request, record for the next person with client.tracker(...)"
            )

    def _room(self) -> bool:
        """Count an item in; False (and counted as dropped) when it must not be kept.
        The caller holds ``_lock``."""
        if not self.enabled:
            return False
        count = self._count
        if not count:
            self._events = []
            self._identifies = []
        elif count >= MAX_ITEMS_PER_TRACKER:
            self._client._count_dropped(1, "tracker_full", TRACKER_FULL_DETAIL)
            return False
        self._count = count + 1
        return True

    def _account_records(self, domain: str) -> _AccountRecords | None:
        """The records of ``domain`` with room for one more item, or None. Holds ``_lock``."""
        if not self._room():
            return None
        accounts = self._accounts
        if accounts is None:
            accounts = self._accounts = {}
        records = accounts.get(domain)
        if records is None:
            records = accounts[domain] = _AccountRecords()
        return records

    def batches(self) -> list[_protocol.Batch]:
        """The requests this tracker's records make (empty when nothing was recorded), as
        they would be handed over now."""
        with _lock:
            return self._build(self._fresh and self._stage != OPEN)[0]

    def _build(self, unheld: bool) -> tuple[list[_protocol.Batch], int]:
        """The batches of what was recorded, and how many person items were left out
        because ``unheld``: the id is one no browser holds, and there is no email to send
        them under instead. Holds ``_lock``."""
        if not self._count:  # reset() keeps the count with its pending batches
            return [], 0
        client = self._client
        # The fields, not the properties: a request tracker's are read from its request at
        # most once, both at the same time (micro: 0.2 us less per hand-over).
        user_agent, ip = self._user_agent, self._ip
        if user_agent is _UNREAD or ip is _UNREAD:
            self._read_request()
            user_agent, ip = self._user_agent, self._ip
        user_agent = user_agent or client.user_agent
        withheld = 0
        result: list[_protocol.Batch] = []
        if self._events or self._identifies:
            profile_id = self.profile_id
            if unheld:
                profile_id = None
                if self.email is None:
                    withheld = len(self._events) + len(self._identifies)
            if not withheld:
                result = _protocol.visitor_batches(
                    profile_id,
                    self.email,
                    ip if client.send_ip else None,
                    self._events,
                    self._identifies,
                    user_agent,
                )
        if self._accounts:
            for domain, records in self._accounts.items():
                result += _protocol.account_batches(domain, records.events, records.identifies, user_agent)
        pending = self._pending
        if pending is not None:
            result = pending + result
        return result, withheld

    def _take(self) -> list[_protocol.Batch]:
        """The hand-over: the batches of everything recorded so far, and a fresh start."""
        with _lock:
            batches, withheld = self._build(self._fresh)
            self._count = 0  # the next record makes fresh lists
            self._accounts = None
            self._pending = None
        if withheld:
            self._client._count_dropped(withheld, "cookie_withheld", COOKIE_WITHHELD_DETAIL)
        return batches

    def send(self) -> None:
        """Hand what was recorded to the client (non-blocking) and start afresh.

        For a new visitor, before the response has started, this waits for the response:
        whether its cookie goes out decides where the records go (see the README).
        """
        if self._fresh and self._stage == OPEN:
            return
        self._client._send_tracker(self)

    def _follow_up(self) -> None:
        """Hand over what was recorded after the hand-over, at once, as its own batch."""
        global _logged_follow_up
        if not _logged_follow_up:
            _logged_follow_up = True
            logger.debug(LOG_FOLLOW_UP)
        try:
            self._client._send_tracker(self)
        except Exception:  # a thread or task of the app: never raise into it over tracking
            logger.exception(LOG_FOLLOW_UP_FAILED)

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

    The middleware tells it when its response starts (:meth:`start_response`) and when the
    request is done (:meth:`finish`).

    :param request: the WSGI ``environ`` or ASGI ``scope``.
    :param visits: the middleware's rules (reading the request, issuing cookies).
    :param set_cookies: the ``Set-Cookie`` values the response must carry, or None.
    :param fresh: ``profile_id`` was made for this request (a new visitor).
    """

    # The visit's own state, apart from what the base class records: the request (until
    # the hand-over), the middleware's rules, and the Set-Cookie values its response needs;
    # ``_respond`` is the server's ``send`` or ``start_response`` that a glue's subclass
    # wraps (set by the glue, never read here; let go of at the hand-over).
    __slots__ = ("_request", "_respond", "_set_cookies", "_visits")

    def __init__(
        self,
        client: Sink,
        profile_id: str | None,
        enabled: bool,
        request: Any,
        visits: RequestRules,
        set_cookies: list[str] | None = None,
        fresh: bool = False,
    ) -> None:
        # Tracker.__init__'s fields set here, without the super() call: one is made for
        # every request (bench part 1, one run: Starlette returning visitor 1.27x -> 1.23x
        # of the bare app). Keep it in step with Tracker.__init__.
        self._client = client
        self.profile_id = profile_id
        self.email = None
        self._user_agent = _UNREAD
        self._ip = _UNREAD
        self.enabled = enabled
        self._accounts = None
        self._count = 0
        self._stage = OPEN
        self._pending = None
        self._fresh = fresh
        self._request: Any = request
        self._visits = visits
        self._set_cookies = set_cookies
        self._respond: Any = None

    # The glue reads ``_set_cookies`` (None: no cookie pending) and sets ``_stage = STARTED``
    # itself for the usual response, instead of calling start_response() (see
    # asgi._with_cookies for the measured reason).

    @property
    def user_agent(self) -> str | None:
        """The visitor's User-Agent, sent with the batch (None: the client's); read from
        the request when first needed."""
        value = self._user_agent
        if value is _UNREAD:
            self._read_request()
            value = self._user_agent
        return value

    @user_agent.setter
    def user_agent(self, value: str | None) -> None:
        self._user_agent = value

    @property
    def ip(self) -> str | None:
        """The visitor's IP address (None unless it is one), read when first needed."""
        value = self._ip
        if value is _UNREAD:
            self._read_request()
            value = self._ip
        return value

    @ip.setter
    def ip(self, value: str | None) -> None:
        self._ip = value

    def _read_request(self) -> None:
        """Fill in the User-Agent and IP not set yet, from the request while it is held
        (None once the middleware let go of it)."""
        request = self._request  # once: the middleware may let go of it meanwhile
        user_agent, ip = self._visits.read_visitor(request) if request is not None else (None, None)
        if self._user_agent is _UNREAD:
            self._user_agent = user_agent
        if self._ip is _UNREAD:
            self._ip = ip

    def _take(self) -> list[_protocol.Batch]:
        # The usual hand-over, _build's visitor part without its calls: a tracked visitor
        # whose id a browser holds, who recorded about no account, no reset() pending, the
        # User-Agent and IP not read yet. The lists are taken under the lock (the next
        # record makes new ones) and the body is built after it. Anything else goes through
        # _build (bench.handover, in place: a Starlette identify + track request 0.8 us less).
        with _lock:
            usual = (
                self._count > 0
                and self._accounts is None
                and self._pending is None
                and not self._fresh
                and self._user_agent is _UNREAD
                and self._ip is _UNREAD
            )
            if usual:
                self._read_request()  # kept for follow-ups, as _build keeps them
                user_agent, ip = self._user_agent, self._ip
                events, identifies = self._events, self._identifies
                profile_id, email = self.profile_id, self.email  # as of these records
                self._count = 0  # the next record makes fresh lists
        if not usual:
            return super()._take()
        client = self._client
        return _protocol.visitor_batches(
            profile_id,
            email,
            ip if client.send_ip else None,
            events,
            identifies,
            user_agent or client.user_agent,
        )

    @property
    def new_visitor(self) -> bool:
        """``profile_id`` was made for this request and no browser holds it (yet)."""
        return self._fresh

    def start_response(self, status: int, cache_control: Callable[[], str | None]) -> list[str] | None:
        """The response starts: the ``Set-Cookie`` values it must carry, or None (none, or
        a response a shared cache may store, or a 304: see ``may_set_cookie``).

        :param cache_control: reads the response's Cache-Control (only needed with cookies).
        """
        self._stage = STARTED
        cookies = self._set_cookies
        if cookies is None or not may_set_cookie(status, cache_control()):
            return None
        self._fresh = False  # a browser holds the id now
        return cookies

    def finish(self) -> None:
        """The request is done (its response went out): hand over what was recorded, and
        let go of the request (no tracker <-> request cycle is left for the garbage
        collector). Records made later are sent as follow-up batches. Never raises."""
        self._stage = HANDED_OVER
        if self._count:  # reset() keeps the count with its pending batches
            try:
                self._client._send_tracker(self)
            except Exception:  # the response is out: never raise into the server's close()
                logger.exception(LOG_HANDOVER_FAILED)
        self._request = None
        self._respond = None  # the server's send: it may hold the request, which holds us

    @property
    def has_records(self) -> bool:
        """Something was recorded that :meth:`finish` will hand over."""
        return bool(self._count)

    def reset(self) -> None:
        """Forget who this visitor is, as Koala's ``ko.reset()`` does at logout.

        What was recorded so far goes to Koala under the current id (and email); the
        response gets a new ``ko_id`` (and server-kept copy), set as for a new visitor, so it
        replaces the pixel's; what is recorded afterwards goes under the new id, with no
        email. ``profile_id`` is the new id from now on. Call it before the response starts.
        A visitor who is not tracked (opted out, excluded path) is left as is.
        """
        if not self.enabled:
            return
        if self._stage != OPEN:
            raise RuntimeError(
                "reset() must be called before the response starts: its Set-Cookie goes in the "
                "response headers (call it in the handler, not in a background task or a stream)"
            )
        visits = self._visits
        with _lock:
            if self._count:
                # The records so far, under the current id; the count stays (one request's cap).
                batches, withheld = self._build(self._fresh)  # a fresh id replaced is never held
                self._pending = batches
                self._events = []
                self._identifies = []
                self._accounts = None
            else:
                withheld = 0
            self.profile_id, self._set_cookies = visits.new_visitor(self._request)
            self.email = None
            self._fresh = True
        if withheld:
            self._client._count_dropped(withheld, "cookie_withheld", COOKIE_WITHHELD_DETAIL)
