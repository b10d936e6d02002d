"""New ids: every event's ``message_id`` and every new visitor's ``ko_id`` is a random UUID v4."""

from __future__ import annotations

import os
from collections.abc import Iterator

__all__ = ["random_uuid4"]


def random_uuid4() -> str:
    """A random UUID v4 in canonical form, as ``str(uuid.uuid4())`` but 10x cheaper.

    Every event's ``message_id`` and every new visitor's ``ko_id`` is one. Same randomness,
    ``os.urandom``, read for 128 ids at a time (one system call instead of 128) and formatted
    without ``uuid.UUID``'s checks (see ``_read_ids``). Handing out the next id is one
    C-level ``next()``, which no two threads can both get; a forked child drops what its
    parent had read (see below).
    """
    try:
        return next(_ids)
    except StopIteration:
        return _read_ids()


_ID_BATCH = 128
_ids: Iterator[str] = iter(())

#: Where each of an id's 32 random hex digits goes in its 37-character slot (36 and a space).
_PLACES = tuple(enumerate(digit + sum(digit >= dash for dash in (8, 12, 16, 20)) for digit in range(32)))
#: The variant digit (10xx): keeps the two low bits of a random hex digit.
_VARIANT = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")
_SLOT = 37


def _read_ids() -> str:
    """Refill the pool; returns its first id.

    Formatted column by column: each of the 37 positions of every id in the batch is one
    strided slice assignment, in C, instead of an f-string of six slices per id (0.16 us an
    id against 0.46, measured for 128 at a time).
    """
    global _ids
    count = _ID_BATCH
    digits = os.urandom(16 * count).hex().encode()
    text = bytearray(_SLOT * count)
    for digit, place in _PLACES:
        text[place::_SLOT] = digits[digit::32]
    text[14::_SLOT] = b"4" * count  # version 4
    text[19::_SLOT] = digits[16::32].translate(_VARIANT)
    for dash in (8, 13, 18, 23):
        text[dash::_SLOT] = b"-" * count
    text[36::_SLOT] = b" " * count
    batch = text.decode("ascii").split()
    _ids = iter(batch[1:])  # two threads refilling at once: each uses its own batch
    return batch[0]


def _forget_ids() -> None:
    """In a forked child: the parent hands out the ids it read; the child reads its own."""
    global _ids
    _ids = iter(())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_ids)
