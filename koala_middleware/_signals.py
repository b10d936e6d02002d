"""Flush at SIGTERM where nothing else handles it, then end the process as SIGTERM would.

Python's default action for SIGTERM ends the process on the spot: no ``finally``, no
``atexit``, so whatever the sender still holds is lost. Servers that handle SIGTERM
(gunicorn, uvicorn, hypercorn, daphne, granian) stop gracefully and the flush happens in
their shutdown; those that leave it at the default (waitress, ``flask run``, werkzeug's
``run_simple``, a plain script or queue worker) get this handler from the first
``KoalaClient`` made in the main thread (the only thread that may install handlers).

It never replaces a handler someone else installed, and a server that installs its own
later simply takes over. The handler itself does next to nothing: it puts SIGTERM back to
its default action and starts a bare thread (``_thread.start_new_thread`` takes no lock,
so a signal landing while the main thread holds one, even ``threading``'s own, cannot
deadlock), then returns, so the interrupted code carries on and releases what it holds.
That thread shuts the clients down within their ``shutdown_timeout`` and sends SIGTERM to
the process again: with the default action back, the process dies of it, with the exit
status SIGTERM gives. A second SIGTERM meanwhile ends the process at once. If the main
thread reaches interpreter exit first, the ``atexit`` flush runs and :func:`exit_as_signalled`
ends the process the same way.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import threading
from collections.abc import Callable

logger = logging.getLogger("koala_middleware")

LOG_SIGTERM_FAILED = "SIGTERM: the flush failed; exiting"

__all__ = ["exit_as_signalled", "install_sigterm_flush"]

#: The signal being handled (set by the handler), so that interpreter exit can re-raise it.
_received: int | None = None
_shutdown: Callable[[], object] | None = None
#: Held by the handler's thread while it shuts down: interpreter exit waits for it.
_busy = _thread.allocate_lock()
#: How long interpreter exit waits for that thread (which is bounded by shutdown_timeout).
EXIT_WAIT = 60.0


def install_sigterm_flush(shutdown: Callable[[], object]) -> bool:
    """Make SIGTERM call ``shutdown()`` (in a new thread) before the process dies of it.

    ``shutdown`` stops every client that wants it, within their ``shutdown_timeout``. Only
    from the main thread, only where SIGTERM is still at its default action; True if the
    handler is (now) ours.
    """
    global _shutdown
    if os.name != "posix" or threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm:
        return True
    if current is not signal.SIG_DFL:  # someone else's (or ignored): theirs to handle
        return False
    _shutdown = shutdown
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def _on_sigterm(signum: int, frame: object) -> None:
    global _received
    _received = signum
    signal.signal(signum, signal.SIG_DFL)
    _thread.start_new_thread(_shut_down_and_die, (signum,))


def _shut_down_and_die(signum: int) -> None:
    _busy.acquire()
    try:
        if _shutdown is not None:
            _shutdown()
    except BaseException:  # the process must still end as SIGTERM would
        logger.exception(LOG_SIGTERM_FAILED)
    finally:
        os.kill(os.getpid(), signum)


def exit_as_signalled() -> None:
    """At interpreter exit, after the ``atexit`` flush: die of the SIGTERM being handled.

    The main thread may finish while the handler's thread still flushes (a script that
    was about to end anyway); without this the process would exit with status 0.
    """
    if _received is None:
        return
    if _busy.acquire(timeout=EXIT_WAIT):  # the handler's thread is done (or never got going)
        _busy.release()
    if signal.getsignal(_received) is signal.SIG_DFL:
        os.kill(os.getpid(), _received)


def _after_fork_in_child() -> None:
    """A child forked while the handler's thread ran has no such thread: start clean."""
    global _busy, _received
    _busy = _thread.allocate_lock()
    _received = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
