"""Process exit: which senders are flushed when the interpreter exits, a ``multiprocessing``
child ends, or SIGTERM arrives (the handler itself is ``_signals``).

Every :class:`KoalaClient` registers here while it lives; a client collected with batches
still pending, or with a spool whose files must be released, leaves its sender here as an
orphan, flushed like a live client's.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

from ._delivery import BackgroundSender, SyncSender
from ._delivery._sender import _live_senders
from ._signals import exit_as_signalled, exiting

logger = logging.getLogger("koala_middleware")

LOG_EXIT_FAILED = "shutdown at interpreter exit failed"
LOG_SIGTERM = "SIGTERM: delivering pending batches (at most %.1fs), then exiting as SIGTERM does"

__all__ = ["orphaned", "register", "shutdown_at_multiprocessing_exit", "shutdown_at_sigterm", "unregister"]


class _Client(Protocol):
    """What exit needs of a ``KoalaClient``."""

    shutdown_timeout: float
    handle_sigterm: bool
    sync: bool

    def flush(self, timeout: float = 5.0) -> bool: ...

    def shutdown(self, timeout: float | None = None) -> bool: ...


_live_clients: weakref.WeakSet[_Client] = weakref.WeakSet()
#: Senders of clients collected while they held batches (or spool files): (shutdown, handle_sigterm).
_orphans: list[tuple[Callable[[], object], bool]] = []


def register(client: _Client) -> None:
    _live_clients.add(client)


def unregister(client: _Client) -> None:
    _live_clients.discard(client)


def orphaned(sender: BackgroundSender | SyncSender, timeout: float, handle_sigterm: bool) -> None:
    """A client was collected: its sender is still shut down at exit if it holds anything."""
    if sender.pending() or (isinstance(sender, BackgroundSender) and sender.spooling):
        _orphans.append((functools.partial(sender.shutdown, timeout), handle_sigterm))


def _stoppers(sigterm: bool) -> list[Callable[[], object]]:
    """What the exit hooks (or, with ``sigterm``, the SIGTERM handler) shut down: every live
    client (that wants it), and the senders of collected ones that still held batches."""
    clients = [c.shutdown for c in list(_live_clients) if not sigterm or (c.handle_sigterm and not c.sync)]
    orphans = [shutdown for shutdown, handle_sigterm in _orphans if not sigterm or handle_sigterm]
    _orphans.clear()
    return [*clients, *orphans]


@atexit.register
def _shutdown_at_exit() -> None:
    exiting()
    for shutdown in _stoppers(sigterm=False):
        try:
            shutdown()
        except Exception:  # never turn interpreter exit into a traceback
            logger.exception(LOG_EXIT_FAILED)
    exit_as_signalled()


_multiprocessing_exit_pid = 0


def shutdown_at_multiprocessing_exit() -> None:
    """In a ``multiprocessing`` child (granian's and hypercorn's workers), also shut down at
    its end: a forked child ends with ``os._exit``, which skips ``atexit``, but it runs
    ``multiprocessing``'s own exit finalizers just before."""
    global _multiprocessing_exit_pid
    multiprocessing = sys.modules.get("multiprocessing")  # not imported: not such a child
    if multiprocessing is None or _multiprocessing_exit_pid == os.getpid():
        return
    if multiprocessing.parent_process() is None:
        return
    _multiprocessing_exit_pid = os.getpid()
    import multiprocessing.util

    multiprocessing.util.Finalize(None, _shutdown_at_exit, exitpriority=100)


def shutdown_at_sigterm() -> None:
    """The SIGTERM handler's work (in its own thread): stop the clients that want it."""
    stoppers = _stoppers(sigterm=True)
    if not stoppers:
        return
    logger.info(LOG_SIGTERM, max([c.shutdown_timeout for c in list(_live_clients)], default=5.0))
    # All at once: the process must end within the longest shutdown_timeout, not their sum.
    threads = [threading.Thread(target=stop, name="koala-sigterm") for stop in stoppers[1:]]
    for thread in threads:
        thread.start()
    stoppers[0]()
    for thread in threads:
        thread.join()
    # Drops counted after a sender's own report (batches in flight at the end, trackers
    # still recording): said now, before the process dies of the signal.
    for sender in list(_live_senders):
        sender.counters.report()
