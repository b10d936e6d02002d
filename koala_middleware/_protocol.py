"""Koala's collection wire format, and nothing else.

See ``shared/koala-docs``: one person (or one account) per request, at most 30 items of each
array per request, ``message_id`` on every event as the idempotency key. Items arrive here
already encoded (see ``_validate``), so building a body is joining strings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._validate import dumps

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


def _chunks(items: Sequence[str], index: int) -> str:
    return ",".join(items[index * MAX_ITEMS_PER_TYPE : (index + 1) * MAX_ITEMS_PER_TYPE])


def _requests_needed(*arrays: Sequence[str]) -> int:
    return max((len(a) + MAX_ITEMS_PER_TYPE - 1) // MAX_ITEMS_PER_TYPE for a in arrays)


def _split(
    head: str, arrays: dict[str, Sequence[str]], ids: Sequence[str], path: str, user_agent: str
) -> Iterator[Batch]:
    """Yield as many bodies as the 30-per-type limit needs, each with ``head`` fields."""
    for index in range(_requests_needed(*arrays.values())):
        parts = [head]
        for name, items in arrays.items():
            chunk = _chunks(items, index)
            if chunk:
                parts.append(f'"{name}":[{chunk}]')
        body = "{" + ",".join(parts) + "}"
        chunk_ids = tuple(ids[index * MAX_ITEMS_PER_TYPE : (index + 1) * MAX_ITEMS_PER_TYPE])
        yield Batch(path, body.encode(), user_agent, chunk_ids)


def visitor_batches(
    *,
    profile_id: str | None,
    email: str | None,
    ip: str | None,
    events: Sequence[str],
    event_ids: Sequence[str],
    identifies: Sequence[str],
    user_agent: str,
) -> Iterator[Batch]:
    head = []
    if profile_id is not None:
        head.append(f'"profile_id":{dumps(profile_id)}')
    if email is not None:
        head.append(f'"email":{dumps(email)}')
    if ip:
        head.append(f'"ip":{dumps(ip)}')
    if profile_id is None and email is None:
        raise ValueError("a Koala batch needs a profile_id or an email; pass one to tracker()")
    return _split(
        ",".join(head),
        {"events": events, "identifies": identifies},
        event_ids,
        VISITOR_PATH,
        user_agent,
    )


def account_batches(
    *,
    domain: str,
    events: Sequence[str],
    event_ids: Sequence[str],
    identifies: Sequence[str],
    user_agent: str,
) -> Iterator[Batch]:
    return _split(
        f'"domain":{dumps(domain)}',
        {"events": events, "identifies": identifies},
        event_ids,
        ACCOUNT_PATH,
        user_agent,
    )


def event_item(message_id: str, event: str, properties_json: str, sent_at: str) -> str:
    return (
        f'{{"message_id":{dumps(message_id)},"type":"track","event":{dumps(event)},'
        f'"properties":{properties_json},"sent_at":"{sent_at}"}}'
    )


def visitor_identify_item(traits_json: str, sent_at: str) -> str:
    return f'{{"type":"identify","sent_at":"{sent_at}","traits":{traits_json}}}'


def account_identify_item(traits_json: str) -> str:
    return f'{{"type":"identify","traits":{traits_json}}}'
