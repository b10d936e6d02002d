"""The sender's thread leaves the process's signals to the main thread (see
``tests/e2e/test_sigterm.py`` for the SIGTERM this is for, in a real process)."""

from __future__ import annotations

import _thread
import selectors
import signal
import socket
import threading

import pytest

from koala_middleware._delivery import _native

pytestmark = pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no signal masks (Windows)")


def blocked_in(thread: _native.SenderThread) -> set[int]:
    seen: list[set[int]] = []
    thread._target = lambda: seen.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    thread.start()
    thread.join(5)
    return seen[0]


@pytest.mark.parametrize("patched", [False, True], ids=["threading", "native (gevent patched)"])
def test_the_senders_thread_blocks_what_the_main_thread_must_take(
    monkeypatch: pytest.MonkeyPatch, patched: bool
) -> None:
    if patched:  # the path taken where gevent patched threading, with the stdlib's own parts
        originals = _native._Originals(
            _thread.start_new_thread,
            _thread.allocate_lock,
            _thread.get_ident,
            socket.getaddrinfo,
            selectors.DefaultSelector,
            socket.socket,
        )
        monkeypatch.setattr(_native, "_originals", lambda: originals)
    blocked = blocked_in(_native.SenderThread(lambda: None, "koala-sender"))
    assert {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD} <= blocked
    assert signal.SIGSEGV not in blocked  # a thread's own faults stay its own
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_on_the_main_thread_it_blocks_nothing() -> None:
    assert threading.current_thread() is threading.main_thread()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    _native.leave_signals_to_others()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
