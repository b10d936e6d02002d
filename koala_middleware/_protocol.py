"""Koala's collection wire format, and nothing else.

See ``shared/koala-docs``: one person (or one account) per request, at most 30 items of each
array per request, ``message_id`` on every event as the idempotency key. Items arrive here
already encoded (see ``_validate``), so building a body is joining strings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._encoding import quote

MAX_ITEMS_PER_TYPE = 30
VISITOR_PATH = "/batch"
ACCOUNT_PATH = "/accounts/batch"


@dataclass(slots=True, eq=False)
class Batch:
    """One HTTP request's worth of data for Koala: what the sender posts and retries.

    :param path: ``/batch`` or ``/accounts/batch``, relative to the project URL.
    :param body: the JSON body, encoded.
    :param user_agent: sent as the request's ``User-Agent`` (the visitor's, when known).
    :param message_ids: the events' idempotency keys, for logs and ``on_error`` hooks.
    """

    path: str
    body: bytes
    user_agent: str
    message_ids: tuple[str, ...] = ()
    attempts: int = field(default=0, repr=False)

    def json(self) -> Any:
        """The body decoded, for logs and tests."""
        return json.loads(self.body)


def _split(
    head: str,
    events: Sequence[str],
    event_ids: Sequence[str],
    identifies: Sequence[str],
    path: str,
    user_agent: str,
) -> list[Batch]:
    """As many bodies as the 30-per-type limit needs, each with ``head`` fields.

    Nearly every tracker fits one request: that case joins its items once, no slicing.
    """
    if len(events) <= MAX_ITEMS_PER_TYPE and len(identifies) <= MAX_ITEMS_PER_TYPE:
        return [_batch(head, events, event_ids, identifies, path, user_agent)] if events or identifies else []
    step = MAX_ITEMS_PER_TYPE
    return [
        _batch(head, events[i : i + step], event_ids[i : i + step], identifies[i : i + step], path, user_agent)
        for i in range(0, max(len(events), len(identifies)), step)
    ]


def _batch(
    head: str, events: Sequence[str], event_ids: Sequence[str], identifies: Sequence[str], path: str, user_agent: str
) -> Batch:
    if events and identifies:
        body = f'{{{head},"events":[{",".join(events)}],"identifies":[{",".join(identifies)}]}}'
    elif events:
        body = f'{{{head},"events":[{",".join(events)}]}}'
    else:
        body = f'{{{head},"identifies":[{",".join(identifies)}]}}'
    return Batch(path, body.encode(), user_agent, tuple(event_ids))


def visitor_batches(
    profile_id: str | None,
    email: str | None,
    ip: str | None,
    events: Sequence[str],
    event_ids: Sequence[str],
    identifies: Sequence[str],
    user_agent: str,
) -> list[Batch]:
    """The person's requests. Positional arguments: this runs for every request that
    recorded something, and a call by keyword costs more."""
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
    return _split(head, events, event_ids, identifies, VISITOR_PATH, user_agent)


def account_batches(
    domain: str,
    events: Sequence[str],
    event_ids: Sequence[str],
    identifies: Sequence[str],
    user_agent: str,
) -> list[Batch]:
    return _split('"domain":' + quote(domain), events, event_ids, identifies, ACCOUNT_PATH, user_agent)


def event_item(message_id: str, event: str, properties_json: str, sent_at: str) -> str:
    return (
        f'{{"message_id":{quote(message_id)},"type":"track","event":{quote(event)},'
        f'"properties":{properties_json},"sent_at":"{sent_at}"}}'
    )


def visitor_identify_item(traits_json: str, sent_at: str) -> str:
    return f'{{"type":"identify","sent_at":"{sent_at}","traits":{traits_json}}}'


def account_identify_item(traits_json: str) -> str:
    return f'{{"type":"identify","traits":{traits_json}}}'
