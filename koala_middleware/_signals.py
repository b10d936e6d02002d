"""Flush at SIGTERM where nothing else handles it, then end the process as SIGTERM would.

Python's default action for SIGTERM ends the process on the spot: no ``finally``, no
``atexit``, so whatever the sender still holds is lost. Servers that handle SIGTERM
(gunicorn, uvicorn, hypercorn, daphne, granian) stop gracefully and the flush happens in
their shutdown; those that leave it at the default (waitress, ``flask run``, werkzeug's
``run_simple``, hypercorn's and other ``multiprocessing`` workers, a script or a queue
worker) get this handler from the first ``KoalaClient`` made in the main thread (the only
thread that may install handlers).

It never replaces a handler someone else installed, and a server that installs its own
later simply takes over; an app handler installed later that chains to this one (calls the
previous handler) runs once: after the flush the process then exits with status 143 (128 +
SIGTERM) instead of dying of the signal, as only the main thread may restore SIGTERM's
default action. Not seen: ``faulthandler.register(SIGTERM)`` before the first client (its
C-level handler is invisible to ``signal.getsignal``; register it after the client with
``chain=True``, or pass ``handle_sigterm=False``); and the flush starts only when the main
thread runs Python code again (CPython runs signal handlers there alone), so a main thread
inside a long C call delays it past ``shutdown_timeout``. The handler does next to nothing: it starts a bare thread
(``_thread.start_new_thread`` takes no lock, so a signal that lands while the main thread
holds one, even one of ``threading``'s own, cannot deadlock) and returns, so the
interrupted code carries on and releases what it holds. That thread shuts the clients down
within their ``shutdown_timeout``, then signals the main thread again; the handler, seeing
the work done, puts SIGTERM back to its default action and raises it, so the process dies
of SIGTERM with the exit status SIGTERM gives. More SIGTERMs meanwhile are ignored: a
parent that terminates its children twice (``multiprocessing`` does, for daemon
processes, at its own exit) must not cut the flush short; it is bounded anyway. If the
main thread reaches interpreter exit first, the ``atexit`` flush runs, then
:func:`exit_as_signalled` waits for the handler's thread to end the process.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from ._delivery._native import os_thread_ident

logger = logging.getLogger("koala_middleware")

LOG_SIGTERM_FAILED = "SIGTERM: the flush failed; exiting"
LOG_SIGTERM_STUCK = "SIGTERM: the main thread did not take the signal back within %.0fs; exiting now"

__all__ = ["exit_as_signalled", "exiting", "install_sigterm_flush"]

#: How long the handler's thread waits for the main thread to end the process before it
#: exits itself (the main thread stuck in a long C call never runs a Python handler).
MAIN_THREAD_WAIT = 2.0
#: How long interpreter exit waits for the handler's thread (itself bounded by shutdown_timeout).
EXIT_WAIT = 60.0

_shutdown: Callable[[], object] | None = None
_main_thread = 0
#: The signal being handled (set by the handler), and whether its flush is over.
_received: int | None = None
_done = False
#: Set when interpreter exit begins (see exiting()).
_exiting = False
#: Held from the signal until the handler's thread is done: interpreter exit waits for it.
_busy = _thread.allocate_lock()


def install_sigterm_flush(shutdown: Callable[[], object]) -> bool:
    """Make SIGTERM call ``shutdown()`` (in a new thread) before the process dies of it.

    ``shutdown`` stops every client that wants it, within their ``shutdown_timeout``. Only
    from the main thread, only where SIGTERM is still at its default action; True if the
    handler is (now) ours.
    """
    global _main_thread, _shutdown
    if os.name != "posix" or threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm:
        return True
    if current is not signal.SIG_DFL:  # someone else's (or ignored): theirs to handle
        return False
    _shutdown, _main_thread = shutdown, os_thread_ident()
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def _on_sigterm(signum: int, frame: object) -> None:
    global _received
    if _done and not _exiting:  # the flush is over: die of the signal, as without this handler
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    elif _received is None:
        _received = signum
        _busy.acquire(False)  # free until now; held for the thread, so that exit waits for it
        try:
            _thread.start_new_thread(_shut_down_then_signal, (signum,))
        except RuntimeError:  # no thread to be had: what SIGTERM would have done anyway
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
    # else: a repeat while flushing; the flush ends within shutdown_timeout anyway


def _shut_down_then_signal(signum: int) -> None:
    global _done
    try:
        if _shutdown is not None:
            _shutdown()
    except BaseException:  # the process must still end as SIGTERM would
        logger.exception(LOG_SIGTERM_FAILED)
    _done = True
    if _exiting:  # the main thread is in the exit hooks: exit_as_signalled ends it
        _busy.release()
        return
    if signal.getsignal(signum) is not _on_sigterm:
        # An app's handler installed after ours called ours (chaining to the previous
        # handler, as if to the default action): signalling again would run it twice.
        # Only the main thread may restore the default action, so end the process here,
        # with the status a shell gives a process killed by the signal.
        logging.shutdown()
        os._exit(128 + signum)
    # To the main thread itself: a process-wide signal could be taken by another thread
    # and leave the main thread asleep in a system call.
    try:
        signal.pthread_kill(_main_thread, signum)
    except (OSError, ValueError, OverflowError):  # the main thread is gone
        os.kill(os.getpid(), signum)
    time.sleep(MAIN_THREAD_WAIT)
    logger.warning(LOG_SIGTERM_STUCK, MAIN_THREAD_WAIT)
    os._exit(128 + signum)  # the shell's status for "killed by signum"


def exiting() -> None:
    """Interpreter exit begins (the ``atexit`` flush is next): from here the handler's
    thread leaves ending the process to :func:`exit_as_signalled`, so that it cannot cut
    short the flush the exit hook runs."""
    global _exiting
    _exiting = True


def exit_as_signalled() -> None:
    """At interpreter exit, after the ``atexit`` flush: let the SIGTERM being handled end
    the process (otherwise it would exit with status 0 while the handler's thread flushes)."""
    if _received is None:
        return
    if _busy.acquire(timeout=EXIT_WAIT):  # the handler's thread is done (or never got going)
        _busy.release()
    signal.signal(_received, signal.SIG_DFL)
    os.kill(os.getpid(), _received)


def _after_fork_in_child() -> None:
    """A child forked while the handler's thread ran has no such thread: start clean."""
    global _busy, _done, _exiting, _main_thread, _received
    _busy = _thread.allocate_lock()
    _done = _exiting = False
    _received = None
    _main_thread = os_thread_ident()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
