"""The process-wide client: configuration, the sender, and the lifecycle around it.

Make one per process (the middlewares make one for you when you pass options instead).
Without a public key it runs in dry-run mode: nothing leaves the process and every batch
it would have sent is logged at INFO on the ``koala_middleware`` logger.
"""

from __future__ import annotations

import collections
import difflib
import json
import logging
import os
import re
import threading
import weakref
from typing import TypedDict

from ._delivery import BackgroundSender, DeliverySettings, DropReason, ErrorHook, Stats, SyncSender
from ._exit import orphaned, register, shutdown_at_multiprocessing_exit, shutdown_at_sigterm, unregister
from ._protocol import Batch
from ._signals import install_sigterm_flush
from ._tracker import Tracker
from ._validate import check_count, check_email, check_flag, check_id, check_optional_text, check_seconds
from ._version import __version__

logger = logging.getLogger("koala_middleware")

DEFAULT_API_URL = "https://api2.getkoala.com"
LOG_DRY_RUN = "dry run (no KOALA_PUBLIC_KEY), would POST %s %s"
LOG_DRY_RUN_ON = "no public key configured; running in dry-run mode, nothing is sent"
LOG_NO_KEY = (
    "no Koala public key: nothing is sent to Koala (dry-run mode; batches are logged at INFO). "
    "Set KOALA_PUBLIC_KEY or pass public_key=; pass dry_run=True to silence this warning.%s"
)

#: ``transport=`` took an httpx transport that replaced the sender's HTTP layer, skipping
#: its deadline, proxy, TLS and answer cap; every path now posts through the one engine.
TRANSPORT_REMOVED = (
    "KoalaClient(transport=...) is no longer supported: every batch goes through the delivery "
    "engine. In tests, start koala_middleware.testing.Collector (a local Koala; the pytest "
    "fixture koala_collector) and pass api_url=collector.url"
)
_KEY = re.compile(r"^[A-Za-z0-9_\-]{1,200}$")


class ClientOptions(TypedDict, total=False):
    """:class:`KoalaClient`'s keyword arguments, as the middlewares take them when they make
    the client themselves (``KoalaWSGIMiddleware(app, public_key=..., timeout=...)``).

    Meanings and defaults are :class:`KoalaClient`'s; this only lets type checkers check them.
    """

    public_key: str | None
    api_url: str | None
    timeout: float
    max_queue_batches: int
    max_queue_bytes: int
    max_in_flight: int
    proxy: str | None
    max_retries: int
    backoff_base: float
    max_backoff: float
    retry_for: float
    shutdown_timeout: float
    on_error: ErrorHook | None
    send_ip: bool
    sync: bool
    dry_run: bool | None
    user_agent: str | None
    transport: None
    handle_sigterm: bool
    spool_dir: str | os.PathLike[str] | None
    max_spool_bytes: int


class KoalaClient:
    """Sends what trackers record to Koala, in the background, without blocking callers.

    :param public_key: your Koala workspace's public key; falls back to ``KOALA_PUBLIC_KEY``.
        With neither, the client runs in dry-run mode (logs, sends nothing).
    :param api_url: falls back to ``KOALA_API_URL``, then ``https://api2.getkoala.com``.
    :param timeout: seconds for each whole attempt to post a batch (connect, send, read the
        answer); with ``sync=True``, for all of a batch's attempts.
    :param max_queue_batches: the queue's bound in batches; past it new batches are dropped
        (counted in :attr:`stats`), never blocking a request.
    :param max_queue_bytes: the queue's bound in bytes, likewise.
    :param max_in_flight: how many batches are posted at once, over as many kept-alive
        connections.
    :param proxy: an ``http://`` or ``https://`` proxy URL (credentials allowed) for every
        request to Koala, overriding the environment's ``HTTPS_PROXY`` / ``HTTP_PROXY`` /
        ``ALL_PROXY`` / ``NO_PROXY``, which apply otherwise.
    :param max_retries: failed attempts after which a batch is given up (network errors,
        408, 429 and 5xx are retried; other 4xx are final).
    :param backoff_base: seconds of the first retry's backoff (doubling, with jitter).
    :param max_backoff: the cap on one backoff, ``Retry-After`` included.
    :param retry_for: seconds a batch is retried at least while Koala fails for every batch
        (down or degraded), even past ``max_retries``, so an outage of a few minutes drops
        nothing while the queue has room. A batch failing alone while Koala accepts the
        others is given up after ``max_retries`` failures of its own. ``0``: ``max_retries``
        only.
    :param shutdown_timeout: seconds :meth:`shutdown` (and interpreter exit) may wait.
    :param on_error: ``on_error(batch, error)``, called for every batch given up.
    :param send_ip: send the visitor's IP (how Koala matches visitors to companies).
    :param sync: send each batch before the hand-over returns (serverless, scripts).
    :param dry_run: force dry-run mode on or off; by default on exactly when there is no key.
    :param user_agent: the User-Agent of batches recorded outside a web request (default
        ``koala-middleware/<version>``).
    :param transport: removed; passing anything raises ``TypeError``. Tests point ``api_url``
        at :class:`koala_middleware.testing.Collector`, a real local Koala.
    :param handle_sigterm: where SIGTERM is still at Python's default action (waitress,
        ``flask run``, scripts) and the client is made in the main thread, flush on SIGTERM
        within ``shutdown_timeout``, then exit as SIGTERM would. A handler installed by
        anyone else is never replaced. ``False`` leaves SIGTERM alone.
    :param spool_dir: keep every batch on disk, in this directory, from its hand-over until
        Koala accepts it, so that it survives a crash or a kill; batches that processes
        which are gone left there are delivered too. Falls back to ``KOALA_SPOOL_DIR``; off
        by default, and in ``sync`` and dry-run modes.
    :param max_spool_bytes: the bound on each process's spool file; past it new batches are
        dropped (``spool_full``).
    """

    def __init__(
        self,
        public_key: str | None = None,
        api_url: str | None = None,
        *,
        timeout: float = 5.0,
        max_queue_batches: int = 10_000,
        max_queue_bytes: int = 32 * 1024 * 1024,
        max_in_flight: int = 100,
        proxy: str | None = None,
        max_retries: int = 8,
        backoff_base: float = 0.5,
        max_backoff: float = 30.0,
        retry_for: float = 600.0,
        shutdown_timeout: float = 5.0,
        on_error: ErrorHook | None = None,
        send_ip: bool = True,
        sync: bool = False,
        dry_run: bool | None = None,
        user_agent: str | None = None,
        transport: None = None,
        handle_sigterm: bool = True,
        spool_dir: str | os.PathLike[str] | None = None,
        max_spool_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        _check_options(locals())
        public_key = public_key or os.environ.get("KOALA_PUBLIC_KEY") or None
        if public_key is not None and not _KEY.match(public_key):
            raise ValueError(
                "public_key must be your Koala workspace's public key (letters, digits, '-' and '_'); "
                "find it in Koala under Settings > Workspace"
            )
        api_url = (api_url or os.environ.get("KOALA_API_URL") or DEFAULT_API_URL).rstrip("/")
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"api_url must start with http:// or https://, got {api_url!r}")
        if on_error is not None and not callable(on_error):
            raise TypeError("on_error must be a callable on_error(batch, error)")
        if transport is not None:
            raise TypeError(TRANSPORT_REMOVED)
        spool_dir = spool_dir or os.environ.get("KOALA_SPOOL_DIR") or None
        if spool_dir is not None and not isinstance(spool_dir, (str, os.PathLike)):
            raise TypeError(f"spool_dir must be a directory path (str or os.PathLike), got {type(spool_dir).__name__}")
        self.public_key = public_key
        self.api_url = api_url
        self.send_ip = send_ip
        self.shutdown_timeout = float(shutdown_timeout)
        self.user_agent = user_agent or f"koala-middleware/{__version__}"
        self.dry_run = public_key is None if dry_run is None else bool(dry_run)
        #: True when batches are sent before the hand-over returns (``sync=True``).
        self.sync = bool(sync)
        #: Whether this client flushes at SIGTERM where nothing else handles it.
        self.handle_sigterm = bool(handle_sigterm)
        if self.sync or self.dry_run:
            spool_dir = None  # nothing waits in memory to be kept
        settings = DeliverySettings(
            base_url=f"{api_url}/web/projects/{public_key}",
            timeout=timeout,
            max_queue_batches=max_queue_batches,
            max_queue_bytes=max_queue_bytes,
            max_in_flight=max_in_flight,
            proxy=proxy,
            max_retries=max_retries,
            backoff_base=backoff_base,
            max_backoff=max_backoff,
            retry_for=retry_for,
            spool_dir=os.fspath(spool_dir) if spool_dir is not None else None,
            max_spool_bytes=max_spool_bytes,
        )
        self._sender: BackgroundSender | SyncSender = (
            SyncSender(settings, on_error) if self.sync else BackgroundSender(settings, on_error)
        )
        #: In dry-run mode, the last batches that would have been sent (newest last).
        self.dry_run_batches: collections.deque[Batch] = collections.deque(maxlen=100)
        self._dry_run_lock = threading.Lock()
        # Loud once when the key is missing (a typo in the variable's name too); not when dry
        # run was asked for, nor under pytest, where a keyless client is the norm.
        self._warn_no_key = dry_run is None and public_key is None
        if self.dry_run:
            logger.info(LOG_DRY_RUN_ON)
        register(self)
        # A client collected with batches still pending (made in a function that returned)
        # leaves its sender to the exit hooks, which flush it like a live client's.
        self._orphaned = weakref.finalize(self, orphaned, self._sender, self.shutdown_timeout, self.handle_sigterm)
        self._orphaned.atexit = False
        if not self.sync and not self.dry_run:
            shutdown_at_multiprocessing_exit()
            if self.handle_sigterm:
                install_sigterm_flush(shutdown_at_sigterm)

    def __repr__(self) -> str:
        mode = "dry-run" if self.dry_run else "sync" if self.sync else "background"
        return f"<KoalaClient {self.api_url} key={self.public_key!r} {mode}>"

    def tracker(
        self, profile_id: str | None = None, email: str | None = None, user_agent: str | None = None
    ) -> Tracker:
        """A tracker for code outside a web request; ``with`` it to send on exit."""
        if profile_id is None and email is None:
            raise ValueError(
                "tracker() needs a profile_id (the visitor's ko_id) or an email: Koala ties every batch to one person"
            )
        if profile_id is not None:
            check_id(profile_id, "profile_id")
        if email is not None:
            email = check_email(email)
        if user_agent is not None:
            check_id(user_agent, "user_agent")
        return Tracker(self, profile_id, email, user_agent=user_agent)

    def _send_tracker(self, tracker: Tracker) -> None:
        """Hand a tracker's records over as batches (non-blocking unless ``sync``)."""
        for batch in tracker._take():
            self._send(batch)

    def _send(self, batch: Batch) -> None:
        if self.dry_run:
            self._sender.counters.add("dry_run")
            with self._dry_run_lock:
                self.dry_run_batches.append(batch)
                warn, self._warn_no_key = self._warn_no_key, False
            if warn and "PYTEST_CURRENT_TEST" not in os.environ:
                logger.warning(LOG_NO_KEY, _misspelt_key_hint())
            logger.info(LOG_DRY_RUN, batch.path, batch.body.decode())
            return
        self._sender.submit(batch)

    def describe(self, batch: Batch) -> str:
        """A batch as Koala would receive it, for people: request line, User-Agent, then
        the JSON body with one line per field and per array item (dry-run demos, logs)."""
        key = self.public_key or "<your public key>"
        lines = [f"POST {self.api_url}/web/projects/{key}{batch.path}", f"User-Agent: {batch.user_agent}", "{"]
        fields = list(batch.json().items())
        for index, (name, value) in enumerate(fields):
            comma = "," if index < len(fields) - 1 else ""
            if isinstance(value, list):
                items = ",\n".join("    " + json.dumps(item) for item in value)
                lines.append(f'  "{name}": [\n{items}\n  ]{comma}')
            else:
                lines.append(f'  "{name}": {json.dumps(value)}{comma}')
        return "\n".join([*lines, "}"])

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything handed over so far is delivered or given up.

        Returns False if ``timeout`` seconds passed first; never waits longer.
        """
        return self._sender.flush(timeout)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Flush (within ``timeout``, default ``shutdown_timeout``), then stop the sender."""
        unregister(self)
        self._orphaned.detach()
        return self._sender.shutdown(self.shutdown_timeout if timeout is None else timeout)

    @property
    def stats(self) -> Stats:
        """A snapshot of the delivery counters (delivered, retried, dropped by reason...)."""
        return self._sender.counters.snapshot(self._sender.pending())

    def _count_dropped(self, items: int, reason: DropReason, detail: str = "") -> None:
        """Count (in :attr:`stats`) and log ``items`` recorded but never sent, and why
        (trackers report theirs here, e.g. ``tracker_full``)."""
        self._sender.counters.dropped(reason, 0, items, detail)


def _misspelt_key_hint() -> str:
    """Names (never values) of set variables that look like a misspelt ``KOALA_PUBLIC_KEY``."""
    near = difflib.get_close_matches("KOALA_PUBLIC_KEY", [name.upper() for name in os.environ], n=3, cutoff=0.8)
    names = [name for name in os.environ if name.upper() in near and name != "KOALA_PUBLIC_KEY"]
    return f" Did you mean KOALA_PUBLIC_KEY instead of {', '.join(sorted(names))}?" if names else ""


def _check_options(options: dict[str, object]) -> None:
    """Type and range of every numeric and switch option, with the keyword in the message:
    a wrong value fails here, at the call that gave it, not as a failing post later."""
    check_seconds("timeout", options["timeout"], positive=True)
    for seconds in ("backoff_base", "max_backoff", "retry_for", "shutdown_timeout"):
        check_seconds(seconds, options[seconds])
    for count in ("max_queue_batches", "max_queue_bytes", "max_in_flight", "max_spool_bytes"):
        check_count(count, options[count], 1)
    check_count("max_retries", options["max_retries"], 0)
    for flag in ("send_ip", "sync", "handle_sigterm"):
        check_flag(flag, options[flag])
    check_flag("dry_run", options["dry_run"], none=True)
    for text in ("public_key", "api_url", "user_agent"):
        check_optional_text(text, options[text])
    check_optional_text("proxy", options["proxy"], "a proxy URL string")


def client_from_options(client: KoalaClient | None, options: ClientOptions) -> KoalaClient:
    """The middlewares' ``client=None, **client_options`` rule: use the client, or make one."""
    if client is not None:
        if options:
            raise TypeError(f"pass client options {sorted(options)} to KoalaClient(...), not alongside client=")
        return client
    return KoalaClient(**options)
