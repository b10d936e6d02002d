"""Call-site checks for what a developer hands the tracker.

A mistake in a handler should fail loudly *where it was made*, with a message that says
how to fix it, rather than surface minutes later as a 400 from Koala in a background thread.
Values are encoded to JSON here, once, so the batch later is assembled from ready fragments
and a caller mutating its dict after ``track()`` cannot change what is sent.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from json.encoder import c_make_encoder as _c_make_encoder  # type: ignore[attr-defined]
from json.encoder import encode_basestring_ascii
from typing import Any

MAX_NAME_LENGTH = 255
MAX_ITEM_BYTES = 32 * 1024
MAX_ID_LENGTH = 255

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]{2,}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")


def _default(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.isoformat()
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ValueError("Decimal NaN/Infinity is not valid JSON")
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise TypeError(type(value).__name__)


# The UUID variant nibble (10xx) for each random hex digit: keeps its two low bits.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def random_uuid4() -> str:
    """A random UUID v4 in canonical form, as ``str(uuid.uuid4())`` but 4x cheaper.

    Every event's ``message_id`` and every new visitor's ``ko_id`` is one. Same randomness,
    ``os.urandom``, read for 64 ids at a time (one system call instead of 64) and formatted
    without ``uuid.UUID``'s checks. Handing out the next id is one C-level ``next()``, which
    no two threads can both get; a forked child drops what its parent had read (see below).
    """
    try:
        return next(_ids)
    except StopIteration:
        return _read_ids()


_ID_BATCH = 64
_ids: Iterator[str] = iter(())


def _read_ids() -> str:
    global _ids
    h = os.urandom(16 * _ID_BATCH).hex()
    batch = [
        f"{h[i:i + 8]}-{h[i + 8:i + 12]}-4{h[i + 13:i + 16]}-{_VARIANT[h[i + 16]]}{h[i + 17:i + 20]}-{h[i + 20:i + 32]}"
        for i in range(0, 32 * _ID_BATCH, 32)
    ]
    _ids = iter(batch[1:])  # two threads refilling at once: each uses its own batch
    return batch[0]


def _forget_ids() -> None:
    """In a forked child: the parent hands out the ids it read; the child reads its own."""
    global _ids
    _ids = iter(())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_ids)


#: ``dumps`` for a str, without the encoder's dispatch: the same function it ends in.
quote = encode_basestring_ascii
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_default)


def dumps(value: Any) -> str:
    """``_encoder.encode(value)``, about twice as cheap: every identify() and track() encodes.

    ``JSONEncoder.encode`` rebuilds its C encoder (and two closures) on each call; this
    uses one C encoder, built once. It keeps no state between calls (no circular-reference
    markers, the only mutable part, so threads can share it): a value that contains itself
    ends in ``RecursionError`` instead of ``ValueError``, which ``encode_mapping`` reports.
    """
    if _c_encoder is None:  # an interpreter without the C accelerator
        return _encoder.encode(value)
    return "".join(_c_encoder(value, 0))


_c_encoder = (
    _c_make_encoder(None, _default, quote, None, ":", ",", False, False, False) if _c_make_encoder else None
)


def _safe_repr(value: Any) -> str:
    """``repr(value)``, or its type's name when that ``__repr__`` raises (or runs long)."""
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__}>"
    return text if len(text) <= 100 else text[:97] + "..."


def _find_bad_value(value: Any, path: str) -> tuple[str, str] | None:
    """Walk ``value`` to name the first part JSON cannot carry (only run after a failure)."""
    if isinstance(value, Mapping):
        try:
            items = list(value.items())
        except Exception as exc:
            return path, f"a {type(value).__name__} whose items() raised {type(exc).__name__}"
        for key, item in items:
            if not isinstance(key, str):
                return f"{path}[{_safe_repr(key)}]", f"a key of type {type(key).__name__} (keys must be str)"
            found = _find_bad_value(item, f"{path}[{_safe_repr(key)}]")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple, set, frozenset)):
        for index, item in enumerate(value):
            found = _find_bad_value(item, f"{path}[{index}]")
            if found:
                return found
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return path, f"the float {value!r} (not valid JSON)"
    if isinstance(value, decimal.Decimal) and not value.is_finite():
        return path, f"the Decimal {value} (not valid JSON)"
    if value is None or isinstance(
        value, (str, int, float, bool, datetime.date, uuid.UUID, decimal.Decimal)
    ):
        return None
    return path, f"a value of type {type(value).__name__}"


def encode_mapping(value: Mapping[str, Any] | None, what: str) -> str:
    """Encode ``properties``/``traits`` to JSON, or raise naming the offending key."""
    if value is None:
        return "{}"
    if type(value) is not dict and not isinstance(value, Mapping):  # a dict skips the ABC check
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}; pass e.g. {what}={{'plan': 'pro'}}")
    try:
        encoded = dumps(value)
    except RecursionError:
        raise ValueError(
            f"{what} contains itself (a circular reference) or is nested too deeply to send as JSON; "
            "pass a copy without the cycle"
        ) from None
    except Exception as exc:  # TypeError, ValueError, or whatever a custom mapping raises
        try:
            found = _find_bad_value(value, what)
        except Exception:  # a value odd enough to fail the walk too: name the whole
            found = None
        where, problem = found if found else (what, f"not encodable ({type(exc).__name__})")
        raise TypeError(
            f"{where} is {problem}, which cannot be sent as JSON; convert it to a str, number, "
            "bool, list or dict (datetime, date, UUID and Decimal are converted for you)"
        ) from None
    if len(encoded) > MAX_ITEM_BYTES:
        raise ValueError(
            f"{what} is {len(encoded)} bytes as JSON, over the {MAX_ITEM_BYTES}-byte limit; "
            "send fewer or shorter values"
        )
    return encoded


def check_name(event: object, what: str = "event") -> str:
    if not isinstance(event, str):
        raise TypeError(f"{what} name must be a str, got {type(event).__name__}; e.g. track('Signed Up')")
    if not event.strip():
        raise ValueError(f"{what} name must not be empty; e.g. track('Signed Up')")
    if len(event) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} name is {len(event)} characters, over the limit of {MAX_NAME_LENGTH}")
    return event


def check_email(email: object) -> str:
    if not isinstance(email, str):
        raise TypeError(f"email must be a str, got {type(email).__name__}")
    email = email.strip()
    if len(email) > 254 or not _EMAIL.match(email):
        raise ValueError(
            "email does not look like an email address (expected name@example.com); "
            "pass the user's address, or leave email out and identify by profile_id"
        )
    return email


def check_id(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise ValueError(f"{what} must be 1 to {MAX_ID_LENGTH} printable characters")
    return value


def check_domain(domain: object) -> str:
    if not isinstance(domain, str):
        raise TypeError(f"account domain must be a str, got {type(domain).__name__}; e.g. account('acme.com')")
    normal = domain.strip().lower().rstrip(".")
    if not _DOMAIN.match(normal):
        raise ValueError(
            f"account domain {domain[:100]!r} is not a bare domain name; pass e.g. 'acme.com' "
            "(no scheme, path, port or email)"
        )
    return normal


# (second, "YYYY-MM-DDTHH:MM:SS") of the last ``now`` formatted; replaced whole, so thread-safe.
_last_second: tuple[int, str] = (-1, "")
# ".000Z" to ".999Z": the milliseconds part, looked up instead of formatted.
_MILLISECONDS = tuple(f".{ms:03d}Z" for ms in range(1000))


def _now_sent_at() -> str:
    """Now, as ``format_sent_at`` writes it: every track() and identify() pays for this,
    and formatting a datetime costs ~2 us, so the seconds part is formatted once a second
    and the milliseconds part is a table lookup (0.25 us in all)."""
    global _last_second
    second, millisecond = divmod(int(time.time() * 1000), 1000)
    cached = _last_second
    if cached[0] != second:
        cached = _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return cached[1] + _MILLISECONDS[millisecond]


def format_sent_at(when: datetime.datetime | None) -> str:
    """ISO 8601 in UTC with milliseconds and ``Z``, the form Koala documents."""
    if when is None:
        return _now_sent_at()
    if not isinstance(when, datetime.datetime):
        raise TypeError(f"sent_at must be a datetime, got {type(when).__name__}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    else:
        when = when.astimezone(datetime.timezone.utc)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{when.microsecond // 1000:03d}Z"
