"""New ids: every event's ``message_id`` and every new visitor's ``ko_id`` is a random UUID v4."""

from __future__ import annotations

import os
from collections.abc import Iterator

__all__ = ["random_uuid4"]


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
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-{_VARIANT[h[i + 16]]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
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
