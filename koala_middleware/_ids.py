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

#: The variant digit (10xx): keeps the two low bits of a random hex digit.
_VARIANT = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")
#: An id's slot in ``bytes.hex("-", 2)`` of its 16 random bytes: eight groups of four hex
#: digits, each followed by a dash (the last id's by nothing). A UUID groups them 8-4-4-4-12:
#: the dashes after the first, sixth and seventh group go (marked ``!``, then deleted), the
#: eighth's becomes the space that separates ids.
_SLOT = 40
_DROPPED_DASHES = (4, 29, 34)
_VERSION_DIGIT = 15  # the first digit of the fourth group
_VARIANT_DIGIT = 20  # the first digit of the fifth group


def _read_ids() -> str:
    """Refill the pool; returns its first id.

    Formatted for the whole batch at once, in a few C calls over one buffer, instead of an
    f-string of six slices per id (0.06 us an id against 0.46, measured for 128 at a time;
    placing each digit with its own strided slice assignment took 0.16 us).
    """
    global _ids
    count = _ID_BATCH
    text = bytearray(os.urandom(16 * count).hex("-", 2), "ascii")
    for dash in _DROPPED_DASHES:
        text[dash::_SLOT] = b"!" * count
    text[_SLOT - 1 :: _SLOT] = b" " * (count - 1)
    text[_VERSION_DIGIT::_SLOT] = b"4" * count
    text[_VARIANT_DIGIT::_SLOT] = text[_VARIANT_DIGIT::_SLOT].translate(_VARIANT)
    batch = text.replace(b"!", b"").decode("ascii").split()
    _ids = iter(batch[1:])  # two threads refilling at once: each uses its own batch
    return batch[0]


def _forget_ids() -> None:
    """In a forked child: the parent hands out the ids it read; the child reads its own."""
    global _ids
    _ids = iter(())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_ids)
