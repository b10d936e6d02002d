"""The sender's own OS thread and event loop, also where gevent monkey-patched the stdlib.

Under gevent (gunicorn ``-k gevent``), ``threading.Thread`` makes a greenlet:
the sender's asyncio loop would share the worker's one OS thread with every request.
Where its selector is the real one (the library was imported before the worker patched,
as with gunicorn ``--preload``), each wait for Koala blocks every request of the worker,
for as long as Koala takes to answer or the backoff lasts; where it is gevent's, the loop
still counts as running in that thread, so a request's ``asyncio.run()`` (or asgiref's
``async_to_sync``) fails with "cannot be called from a running event loop".

So where gevent patched ``threading``, the sender runs on a thread started with the original
``_thread.start_new_thread``, and its loop uses the original selector, a self-pipe made by
the C ``_socket.socketpair`` (gevent's ``socket.socketpair``, even the "original" one,
makes gevent sockets, which create a gevent hub in the sender's thread: two threads then
import gevent's loop module at once and deadlock on the import locks, a host that hangs at
start-up), and resolves host names with the original ``getaddrinfo`` on a native thread of its own: asyncio's default
executor would make its workers greenlets of this thread, which no hub ever runs (and
which the interpreter then waits for at exit). All of these are looked up when used, not
at import: a worker patches after ``--preload`` imported this module. The sender and the
request side share state through locks from the original ``_thread.allocate_lock``, which
exclude OS threads whatever was patched; they are held for a few steps, never across I/O,
so a greenlet waiting on one stalls its worker for microseconds at most.

Eventlet is left as it is: gunicorn no longer has an eventlet worker, eventlet itself is
deprecated, and its copies of the original modules (``patcher.original("selectors")``)
hand out a selector that fails; there the sender stays a green thread, which delivers.

Every sender thread leaves the process's signals to the other threads (see
:func:`leave_signals_to_others`).

Without gevent's patching these are ``threading.Thread``, ``threading.Lock``,
``selectors.DefaultSelector`` and ``asyncio.SelectorEventLoop``, unchanged.
"""

from __future__ import annotations

import _socket
import _thread
import asyncio
import contextlib
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = [
    "Lock",
    "LockType",
    "SenderThread",
    "leave_signals_to_others",
    "new_event_loop",
    "new_selector",
    "os_thread_ident",
]

LockType = _thread.LockType


class _Originals(NamedTuple):
    """The stdlib functions and classes the sender needs, as they were before gevent patched them."""

    start_new_thread: Callable[..., int]
    allocate_lock: Callable[[], LockType]
    get_ident: Callable[[], int]
    getaddrinfo: Callable[..., Any]
    selector: type[selectors.BaseSelector]
    socket: type[socket.socket]


def _originals() -> _Originals | None:
    """What gevent replaced, as it was; None when gevent did not patch ``threading``.

    Read from ``sys.modules`` only: a process that never imported gevent is not patched,
    and importing it here would cost every other process its start-up.
    """
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        start, allocate, ident = monkey.get_original("_thread", ("start_new_thread", "allocate_lock", "get_ident"))
        return _Originals(
            start,
            allocate,
            ident,
            monkey.get_original("socket", "getaddrinfo"),
            monkey.get_original("selectors", "DefaultSelector"),
            monkey.get_original("socket", "socket"),
        )
    return None


def Lock() -> LockType:
    """A lock that excludes OS threads, also where ``threading.Lock`` was patched to a greenlet lock."""
    originals = _originals()
    return _thread.allocate_lock() if originals is None else originals.allocate_lock()


def os_thread_ident() -> int:
    """The calling OS thread's ``pthread_t``, as ``signal.pthread_kill`` needs it: under
    gevent's patching ``threading.get_ident()`` is a greenlet's ``id()``, which
    ``pthread_kill`` would take for a thread pointer (undefined behaviour; hangs seen)."""
    originals = _originals()
    return _thread.get_ident() if originals is None else originals.get_ident()


def new_selector() -> selectors.BaseSelector:
    """A selector that blocks this OS thread alone (gevent's would wait on a hub no one runs here)."""
    originals = _originals()
    return selectors.DefaultSelector() if originals is None else originals.selector()


def new_event_loop(selector: selectors.BaseSelector) -> asyncio.AbstractEventLoop:
    """An event loop on ``selector`` for a :class:`SenderThread`."""
    originals = _originals()
    return asyncio.SelectorEventLoop(selector) if originals is None else _NativeLoop(selector, originals)


class _NativeLoop(asyncio.SelectorEventLoop):
    """A loop whose ``getaddrinfo`` runs the original one on a native thread per lookup.

    Lookups happen once per new connection (connections are kept alive), so a thread
    each costs little, and nothing needs a pool to shut down at exit.
    """

    def __init__(self, selector: selectors.BaseSelector, originals: _Originals) -> None:
        self._originals = originals
        super().__init__(selector)

    def _make_self_pipe(self) -> None:
        # asyncio's own four lines (3.10 to 3.14), but with the C socketpair: see the module
        # docstring. ``_socket.socket`` has all the self-pipe needs (recv, send, close).
        self._ssock, self._csock = _socket.socketpair()
        self._ssock.setblocking(False)
        self._csock.setblocking(False)
        self._internal_fds += 1  # type: ignore[attr-defined]
        self._add_reader(self._ssock.fileno(), self._read_from_self)  # type: ignore[attr-defined]

    async def getaddrinfo(
        self,
        host: bytes | str | None,
        port: bytes | str | int | None,
        *,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:  # typeshed's exact type differs between Python versions
        future: asyncio.Future[list[Any]] = self.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():  # cancelled meanwhile
                return
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

        def resolve() -> None:
            try:
                result, error = self._originals.getaddrinfo(host, port, family, type, proto, flags), None
            except BaseException as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown): no one waits
                self.call_soon_threadsafe(settle, result, error)

        self._originals.start_new_thread(resolve, ())
        return await future

    async def create_connection(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: str | None = None,
        port: int | None = None,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """asyncio's, but the socket is the original ``socket.socket``: asyncio would make a
        patched one, which creates a gevent hub in this thread (see ``_make_self_pipe``).
        Tries each address in turn (no Happy Eyeballs, as asyncio's default)."""
        if kwargs.get("sock") is not None or host is None:
            return await super().create_connection(protocol_factory, host, port, **kwargs)  # type: ignore[arg-type]
        options = {key: kwargs.pop(key) for key in ("family", "proto", "flags") if key in kwargs}
        local = kwargs.pop("local_addr", None)
        infos = await self.getaddrinfo(
            host,
            port,
            family=options.get("family", 0),
            type=socket.SOCK_STREAM,
            proto=options.get("proto", 0),
            flags=options.get("flags", 0),
        )
        if not infos:
            raise OSError(f"getaddrinfo({host!r}) returned an empty list")
        errors: list[OSError] = []
        for family, kind, proto, _, address in infos:
            sock = self._originals.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                if local is not None:
                    sock.bind(local)
                await self.sock_connect(sock, address)
            except OSError as error:
                sock.close()
                errors.append(error)
                continue
            except BaseException:
                sock.close()
                raise
            if kwargs.get("ssl") and kwargs.get("server_hostname") is None:
                kwargs["server_hostname"] = host
            return await super().create_connection(protocol_factory, sock=sock, **kwargs)
        raise errors[0] if len(errors) == 1 else OSError(f"could not connect to {host!r}: {errors}")


#: Signals raised by the faulting thread itself: blocking them would not stop them.
_FAULTS = frozenset(
    getattr(signal, name)
    for name in ("SIGABRT", "SIGBUS", "SIGFPE", "SIGILL", "SIGSEGV", "SIGSYS", "SIGTRAP")
    if hasattr(signal, name)
)


def leave_signals_to_others() -> None:
    """Block the process's signals in the calling thread, unless it is the main one.

    A signal sent to the process (``kill``, a supervisor's SIGTERM, a terminal's SIGINT)
    goes to any one thread that does not block it. Python runs its handlers on the main
    thread only, when that thread next runs Python code: a signal the kernel gave the
    sender's thread while the main thread sleeps in C (a gevent hub or a server waiting
    in ``epoll`` with no timeout, a ``lock.acquire()``) stays unhandled, and a SIGTERM
    that should flush and end the process leaves it running for ever (a SIGTERM sent to the
    sender's thread of an idle gevent server did so every time). Blocked here, the kernel
    hands them to the main thread instead. Threads this one starts (the resolver's) inherit
    the mask. A no-op on the main thread (a green sender runs there) and where there is no
    ``pthread_sigmask`` (Windows).
    """
    if not hasattr(signal, "pthread_sigmask"):
        return
    if _thread.get_native_id() == threading.main_thread().native_id:
        return
    with contextlib.suppress(OSError, ValueError):  # unblocked, the thread still delivers
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - _FAULTS)


class SenderThread:
    """Runs ``target`` on a daemon OS thread; the subset of ``threading.Thread`` the sender uses.

    Unpatched, it is a ``threading.Thread`` (named, listed by ``threading.enumerate()``).
    Patched, a native thread whose end releases a native lock, for ``join`` and ``is_alive``.
    """

    __slots__ = ("_done", "_get_ident", "_target", "_thread", "ident", "name")

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target = target
        self.name = name
        self.ident: int | None = None
        self._thread: threading.Thread | None = None
        self._done: LockType | None = None
        self._get_ident: Callable[[], int] = threading.get_ident

    def start(self) -> None:
        """Start the thread; raises RuntimeError if the OS refuses one, as ``threading`` does."""
        originals = _originals()
        if originals is None:
            self._thread = threading.Thread(target=self._run_threading, name=self.name, daemon=True)
            self._thread.start()
            return
        self._get_ident = originals.get_ident
        self._done = done = originals.allocate_lock()
        done.acquire()
        try:
            self.ident = originals.start_new_thread(self._run_native, (done,))
        except BaseException:
            self._done = None
            raise

    def _run_threading(self) -> None:
        # Set here, not after start() returns: the thread may post a batch and call an
        # on_error hook (which asks is_current()) before the starting thread runs again.
        self.ident = self._get_ident()
        leave_signals_to_others()
        self._target()

    def _run_native(self, done: LockType) -> None:
        self.ident = self._get_ident()  # before start() returns it: is_current() works at once
        try:
            leave_signals_to_others()
            self._target()
        finally:
            done.release()

    def is_current(self) -> bool:
        """Whether the caller runs on this thread."""
        return self.ident is not None and self._get_ident() == self.ident

    def is_alive(self) -> bool:
        if self._thread is not None:
            return self._thread.is_alive()
        return self._done is not None and self._done.locked()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        elif self._done is not None and self._done.acquire(True, max(timeout, 0.0)):
            self._done.release()
