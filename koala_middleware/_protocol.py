"""Koala's collection wire format, and nothing else.

See ``shared/koala-docs``: one person (or one account) per request, at most 30 items of each
array per request, ``message_id`` on every event as the idempotency key. Items arrive here
already encoded (see ``_validate``), so building a body is joining strings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ._encoding import quote

MAX_ITEMS_PER_TYPE = 30
VISITOR_PATH = "/batch"
ACCOUNT_PATH = "/accounts/batch"


class Batch:
    """One HTTP request's worth of data for Koala: what the sender posts and retries.

    :param path: ``/batch`` or ``/accounts/batch``, relative to the project URL.
    :param body: the JSON body, encoded.
    :param user_agent: sent as the request's ``User-Agent`` (the visitor's, when known).
    :param message_ids: the events' idempotency keys, for logs and ``on_error`` hooks; read
        from the body when not given (see :attr:`message_ids`).
    """

    __slots__ = ("_message_ids", "attempts", "body", "event_count", "path", "user_agent")

    def __init__(
        self, path: str, body: bytes, user_agent: str, message_ids: tuple[str, ...] | None = None, event_count: int = -1
    ) -> None:
        self.path = path
        self.body = body
        self.user_agent = user_agent
        self._message_ids = message_ids
        self.attempts = 0
        #: How many events the body carries (counted as delivered or dropped).
        self.event_count = event_count if event_count >= 0 else len(self.message_ids)

    @property
    def message_ids(self) -> tuple[str, ...]:
        """The events' ``message_id`` values, in order.

        A batch the tracker built keeps none of its own: they are in the body, and read
        from it (~4 us) only when asked (an ``on_error`` hook, the spool), then kept. A
        queued batch then holds its body, its User-Agent and little else: a tuple of id
        strings was 130 bytes of each batch's ~830 (``bench/memory.py``).
        """
        ids = self._message_ids
        if ids is None:
            try:
                events = json.loads(self.body).get("events") or ()
                ids = tuple(str(event.get("message_id")) for event in events)
            except (ValueError, AttributeError, TypeError):  # a body from elsewhere
                ids = ()
            self._message_ids = ids  # asked once, asked again (the spool: its size, its row)
        return ids

    def json(self) -> Any:
        """The body decoded, for logs and tests."""
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Batch(path={self.path!r}, body={self.body!r}, user_agent={self.user_agent!r})"


def _split(
    head: str,
    events: Sequence[str],
    identifies: Sequence[str],
    path: str,
    user_agent: str,
) -> list[Batch]:
    """As many bodies as the 30-per-type limit needs, each with ``head`` fields."""
    step = MAX_ITEMS_PER_TYPE
    return [
        _batch(head, events[i : i + step], identifies[i : i + step], path, user_agent)
        for i in range(0, max(len(events), len(identifies)), step)
    ]


def _batch(head: str, events: Sequence[str], identifies: Sequence[str], path: str, user_agent: str) -> Batch:
    if events and identifies:
        body = f'{{{head},"events":[{",".join(events)}],"identifies":[{",".join(identifies)}]}}'
    elif events:
        body = f'{{{head},"events":[{",".join(events)}]}}'
    else:
        body = f'{{{head},"identifies":[{",".join(identifies)}]}}'
    return Batch(path, body.encode(), user_agent, None, len(events))


def visitor_batches(
    profile_id: str | None,
    email: str | None,
    ip: str | None,
    events: Sequence[str],
    identifies: Sequence[str],
    user_agent: str,
) -> list[Batch]:
    """The person's requests. Positional arguments: this runs for every request that
    recorded something, and a call by keyword costs more.

    Nearly every request's records fit one body: that case is built here, with no call but
    the C ones (0.45 us against 0.99 us through ``_split`` and ``_batch``, measured).
    """
    if profile_id is None:
        if email is None:
            raise ValueError("a Koala batch needs a profile_id or an email; pass one to tracker()")
        head = '"email":' + quote(email)
    elif email is None:
        head = '"profile_id":' + quote(profile_id)
    else:
        head = '"profile_id":' + quote(profile_id) + ',"email":' + quote(email)
    if ip:
        head += ',"ip":' + quote(ip)
    if len(events) > MAX_ITEMS_PER_TYPE or len(identifies) > MAX_ITEMS_PER_TYPE:
        return _split(head, events, identifies, VISITOR_PATH, user_agent)
    if events:
        if identifies:
            body = f'{{{head},"events":[{",".join(events)}],"identifies":[{",".join(identifies)}]}}'
        else:
            body = f'{{{head},"events":[{",".join(events)}]}}'
    elif identifies:
        body = f'{{{head},"identifies":[{",".join(identifies)}]}}'
    else:
        return []
    return [Batch(VISITOR_PATH, body.encode(), user_agent, None, len(events))]


def account_batches(
    domain: str,
    events: Sequence[str],
    identifies: Sequence[str],
    user_agent: str,
) -> list[Batch]:
    if not events and not identifies:
        return []
    return _split('"domain":' + quote(domain), events, identifies, ACCOUNT_PATH, user_agent)


def event_item(quoted_message_id: str, event: str, properties_json: str, sent_at: str) -> str:
    """An event; its ``message_id`` comes quoted (the ids made here need no escaping)."""
    return (
        f'{{"message_id":{quoted_message_id},"type":"track","event":{quote(event)},'
        f'"properties":{properties_json},"sent_at":"{sent_at}"}}'
    )


def visitor_identify_item(traits_json: str, sent_at: str) -> str:
    return f'{{"type":"identify","sent_at":"{sent_at}","traits":{traits_json}}}'


def account_identify_item(traits_json: str) -> str:
    return f'{{"type":"identify","traits":{traits_json}}}'
