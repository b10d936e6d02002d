"""The on-disk spool: every batch on disk from its hand-over until Koala accepts it.

Off unless ``spool_dir`` (or ``KOALA_SPOOL_DIR``) is set. Each process writes its own
SQLite database in that directory (WAL journal, ``synchronous=NORMAL``: a commit is in the
operating system's hands before the hand-over returns, so it survives the process being
killed, ``kill -9`` and OOM included; a power cut may lose the last moments, never the
file's consistency). The file is opened with SQLite's exclusive locking mode, so it stays
locked while its process lives and the kernel releases the lock when the process dies,
however it dies.

A process that finds a file whose lock it can take (its owner is gone) adopts it: it keeps
the lock, delivers the file's batches like its own, and deletes the file once it is empty.
Taking the lock is the only way in, so two processes sharing the directory never deliver
the same batch twice. A file that is not a readable spool is renamed ``*.corrupt`` with a
warning and left alone. Nothing here raises into the host: a spool that cannot be written
(full disk, read-only volume) logs once and leaves the batches in memory, as without one.

After ``os.fork()`` the child never touches its parent's files (SQLite connections must not
cross a fork; even closing one there would disturb the parent's): it opens its own file on
its first hand-over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .._protocol import Batch
from . import _native

if TYPE_CHECKING:
    import sqlite3

logger = logging.getLogger("koala_middleware")

LOG_SPOOL_UNAVAILABLE = "the spool in %s cannot be written (%s); batches are kept in memory only"
LOG_SPOOL_CORRUPT = "%s is not a readable spool file (%s); set aside as %s"
LOG_SPOOL_ADOPTED = "adopted %d batch(es) left in %s by a process that is gone"
LOG_SPOOL_LEFT = "%d batch(es) left in the spool %s for the next process to deliver"

#: The sender checkpoints its own file's WAL after this many transactions on it (so that the
#: checkpoint's fsync never lands on a request thread's hand-over, and the WAL, a page per
#: hand-over, stays within a few megabytes also while nothing is delivered).
CHECKPOINT_EVERY = 1000

PREFIX = "koala-spool-"
SUFFIX = ".sqlite3"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS batches ("
    "id INTEGER PRIMARY KEY, path TEXT NOT NULL, user_agent TEXT NOT NULL, message_ids TEXT NOT NULL, "
    "body BLOB NOT NULL, due REAL)"  # due: NULL while in memory; else when to load it (monotonic)
)

#: Connections inherited from a parent process: never closed nor collected in the child.
_inherited: list[object] = []


def _size(batch: Batch) -> int:
    return len(batch.body) + len(batch.user_agent) + 37 * batch.event_count + 64


class SpoolFile:
    """One locked spool database: this process's own, or one adopted from a dead process."""

    def __init__(self, path: str, connection: sqlite3.Connection) -> None:
        self.path = path
        self.db = connection
        self.rows = 0  # batches stored here, in memory or not

    @classmethod
    def open(cls, path: str) -> SpoolFile:
        """Open and lock ``path`` (created if missing); raises if locked or unreadable."""
        import sqlite3

        db = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")  # before WAL: no shared memory, one owner
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")  # the sender checkpoints: see Spool.sync
            db.execute("BEGIN EXCLUSIVE")  # the lock, held from here until close
            db.execute(_SCHEMA)
            db.execute("COMMIT")
            spool = cls(path, db)
            spool.rows = db.execute("SELECT count(*) FROM batches").fetchone()[0]
        except BaseException:
            db.close()
            raise
        return spool

    def insert(self, batch: Batch, due: float | None) -> int:
        row = self.db.execute(
            "INSERT INTO batches (path, user_agent, message_ids, body, due) VALUES (?, ?, ?, ?, ?)",
            (batch.path, batch.user_agent, " ".join(batch.message_ids), batch.body, due),
        ).lastrowid
        self.rows += 1
        assert row is not None
        return row

    def delete(self, rows: list[int]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM batches WHERE id = ?", [(row,) for row in rows])
        self.db.execute("COMMIT")
        self.rows -= len(rows)

    def load(self, now: float, limit: int) -> list[tuple[int, Batch]]:
        """Up to ``limit`` batches due by ``now``, marked as in memory."""
        rows = self.db.execute(
            "SELECT id, path, user_agent, message_ids, body FROM batches WHERE due <= ? ORDER BY id LIMIT ?",
            (now, limit),
        ).fetchall()
        if rows:
            self.db.execute("BEGIN")
            self.db.executemany("UPDATE batches SET due = NULL WHERE id = ?", [(row[0],) for row in rows])
            self.db.execute("COMMIT")
        return [(row[0], _batch(*row[1:])) for row in rows]

    def next_due(self) -> float | None:
        due: float | None = self.db.execute("SELECT min(due) FROM batches WHERE due IS NOT NULL").fetchone()[0]
        return due

    def close(self, remove: bool) -> None:
        try:
            self.db.close()
        finally:
            if remove:
                _unlink(self.path, self.path + "-wal", self.path + "-shm")


def _batch(path: object, user_agent: object, message_ids: object, body: object) -> Batch:
    if not (isinstance(path, str) and isinstance(user_agent, str) and isinstance(message_ids, str)):
        raise ValueError("a row with fields of the wrong type")
    if not isinstance(body, bytes):
        raise ValueError("a row whose body is not bytes")
    return Batch(path, body, user_agent, tuple(message_ids.split()) if message_ids else ())


class Spool:
    """This process's spool file, the files it adopted, and which batch is in which row.

    Thread-safe: hand-overs (request threads) and the sender thread share one lock (an OS
    lock also under gevent, as the queue's); every call is a short SQLite statement on a
    local file.
    """

    def __init__(self, directory: str, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        #: ``on_stranded(count, lost)``: batches on disk only that this process can no longer
        #: load (their file turned out unreadable); ``lost`` when the file was set aside,
        #: else they stay in it for the process that adopts it once this one is gone.
        self.on_stranded: Callable[[int, bool], None] | None = None
        self._lock = _native.Lock()
        self._init_state()

    def _init_state(self) -> None:
        self._own: SpoolFile | None = None
        self._adopted: list[SpoolFile] = []
        self._rows: dict[Batch, tuple[SpoolFile, int]] = {}
        self._done: list[tuple[SpoolFile, int]] = []  # rows of finished batches, to delete
        self._writes = 0  # transactions on our own file since its last checkpoint
        self._bytes = 0
        self._broken = False  # cannot write: memory only from now on (logged once)
        self._own_unreadable = False  # and cannot even read it: no more loading from it
        self._stranded: list[tuple[int, bool]] = []  # for on_stranded, outside the lock
        self._closed = False
        self._pid = os.getpid()
        self._foreign: set[str] = set()  # a parent's files, in a forked child

    def after_fork(self) -> None:
        """In a forked child: forget the parent's files without closing them, and never
        try to adopt them (SQLite's in-process lock records came along with the fork)."""
        parents = [spool for spool in [self._own, *self._adopted] if spool is not None]
        _inherited.extend(spool.db for spool in parents)
        foreign = self._foreign | {spool.path for spool in parents}
        self._lock = _native.Lock()
        self._init_state()
        self._foreign = foreign

    # -- the request side ---------------------------------------------------------------

    def add(self, batch: Batch) -> str:
        """Store ``batch`` durably: "" when stored, "spool_full" past ``max_spool_bytes``,
        or "memory" when the spool cannot be used (the batch is still deliverable)."""
        size = _size(batch)
        with self._lock:
            if self._closed or self._broken:
                return "memory"
            if self._bytes + size > self.max_bytes:
                return "spool_full"
            try:
                own = self._own or self._open_own()
                row = own.insert(batch, None)
            except Exception as error:  # full disk, read-only volume, vanished directory
                self._break(error)
                return "memory"
            self._writes += 1
            self._rows[batch] = own, row
            self._bytes += size
            return ""

    def _open_own(self) -> SpoolFile:
        os.makedirs(self.directory, exist_ok=True)
        name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}{SUFFIX}"
        self._own = SpoolFile.open(os.path.join(self.directory, name))
        return self._own

    def _break(self, error: BaseException) -> None:
        if not self._broken:
            self._broken = True
            logger.warning(LOG_SPOOL_UNAVAILABLE, self.directory, f"{type(error).__name__}: {error}")

    # -- the sender side ----------------------------------------------------------------

    def holds(self, batch: Batch) -> bool:
        return batch in self._rows

    def remove(self, batch: Batch) -> None:
        """``batch`` is done (delivered, or given up for good): off the disk at the next
        :meth:`sync`. Until then a crash would deliver it again; Koala deduplicates by
        ``message_id``."""
        with self._lock:
            place = self._rows.pop(batch, None)
            if place is None:
                return
            if place[0] is self._own:
                self._bytes -= _size(batch)
            self._done.append(place)

    @property
    def finished(self) -> int:
        """Batches removed but not deleted from disk yet."""
        return len(self._done)

    @property
    def needs_sync(self) -> bool:
        """Finished batches to delete, or a WAL to checkpoint."""
        return bool(self._done) or self._writes >= CHECKPOINT_EVERY

    def sync(self) -> None:
        """Delete the rows of finished batches, one transaction per file (the sender calls
        this when it has a moment: a delete per batch cost it a third of its throughput),
        delete adopted files that are now empty, and checkpoint our own file now and then."""
        with self._lock:
            done, self._done = self._done, []
            files: dict[SpoolFile, list[int]] = {}
            for spool, row in done:
                files.setdefault(spool, []).append(row)
            for spool, rows in files.items():
                if spool is not self._own and spool not in self._adopted:
                    continue  # set aside meanwhile
                try:
                    spool.delete(rows)
                except Exception as error:
                    self._set_aside_or_break(spool, error)
                    continue
                if spool is self._own:
                    self._writes += 1
                elif not spool.rows:
                    self._adopted.remove(spool)
                    spool.close(remove=True)
            if self._own is not None and self._writes >= CHECKPOINT_EVERY:
                self._writes = 0
                try:
                    self._own.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except Exception as error:
                    self._break(error)
        self._report_stranded()

    def park(self, batch: Batch, due: float) -> bool:
        """Keep ``batch`` on disk only, to load again at ``due`` (monotonic); False if it is
        not in the spool (then it is the caller's to give up)."""
        with self._lock:
            place = self._rows.pop(batch, None)
            if place is None:
                return False
            spool, row = place
            try:
                spool.db.execute("UPDATE batches SET due = ? WHERE id = ?", (due, row))
                self._writes += spool is self._own
            except Exception as error:
                self._rows[batch] = place
                self._set_aside_or_break(spool, error)
                failed = True
            else:
                failed = False
        self._report_stranded()
        return not failed

    def load(self, now: float, limit: int) -> tuple[list[Batch], float | None]:
        """Batches due by ``now`` (at most ``limit``), and when the next one is due."""
        loaded: list[Batch] = []
        next_due: float | None = None
        with self._lock:
            for spool in self._files():
                if spool is self._own and self._own_unreadable:
                    continue
                try:
                    if len(loaded) < limit:
                        for row, batch in spool.load(now, limit - len(loaded)):
                            self._rows[batch] = spool, row
                            loaded.append(batch)
                    due = spool.next_due()
                except Exception as error:
                    if spool is self._own:  # its parked batches are out of reach now
                        self._own_unreadable = True
                        self._stranded.append((self._disk_only(spool), False))
                    self._set_aside_or_break(spool, error)
                    continue
                if due is not None and (next_due is None or due < next_due):
                    next_due = due
        self._report_stranded()
        return loaded, next_due

    def _disk_only(self, spool: SpoolFile) -> int:
        """Rows of ``spool`` neither in memory nor finished: batches waiting on disk only."""
        in_memory = sum(1 for place in self._rows.values() if place[0] is spool)
        finished = sum(1 for place in self._done if place[0] is spool)
        return max(spool.rows - in_memory - finished, 0)

    def _report_stranded(self) -> None:
        with self._lock:
            stranded, self._stranded = self._stranded, []
        if self.on_stranded is not None:
            for count, lost in stranded:
                if count:
                    self.on_stranded(count, lost)

    def adopt(self) -> int:
        """Take over the files of processes that are gone; the batches they hold (all due now)."""
        if self._closed or os.getpid() != self._pid:
            return 0
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return 0
        with self._lock:
            mine = {spool.path for spool in self._files()} | self._foreign
        recovered = 0
        for name in names:
            path = os.path.join(self.directory, name)
            if not (name.startswith(PREFIX) and name.endswith(SUFFIX)) or path in mine:
                continue
            spool = self._take_over(path)
            if spool is None:
                continue
            if not spool.rows:
                spool.close(remove=True)
                continue
            try:
                spool.db.execute("UPDATE batches SET due = 0")
            except Exception as error:
                self._set_aside(spool, error)
                continue
            with self._lock:
                if self._closed:
                    spool.close(remove=False)
                    break
                self._adopted.append(spool)
            logger.info(LOG_SPOOL_ADOPTED, spool.rows, path)
            recovered += spool.rows
        return recovered

    def _take_over(self, path: str) -> SpoolFile | None:
        import sqlite3

        try:
            return SpoolFile.open(path)
        except sqlite3.OperationalError as error:
            text = str(error).lower()
            if "locked" in text or "busy" in text or "unable to open" in text:
                return None  # alive (its owner holds the lock), or not ours to read
            _set_aside_path(path, error)
        except Exception as error:  # "file is not a database", "malformed", ...
            _set_aside_path(path, error)
        return None

    def _files(self) -> Iterator[SpoolFile]:
        if self._own is not None:
            yield self._own
        yield from list(self._adopted)

    def _set_aside_or_break(self, spool: SpoolFile, error: BaseException) -> None:
        """A statement failed: an adopted file turned out corrupt, or our own disk fails."""
        if spool is self._own:
            self._break(error)
        else:
            self._stranded.append((self._disk_only(spool), True))
            self._adopted.remove(spool)
            self._rows = {batch: place for batch, place in self._rows.items() if place[0] is not spool}
            self._set_aside(spool, error)

    def _set_aside(self, spool: SpoolFile, error: BaseException) -> None:
        with contextlib.suppress(Exception):
            spool.db.close()
        _set_aside_path(spool.path, error)

    def close(self) -> int:
        """At shutdown: release every file; the batches still in them stay for the next
        process. Returns how many there are."""
        if os.getpid() == self._pid:
            self.sync()
        with self._lock:
            self._closed = True
            if os.getpid() != self._pid:
                return 0
            left = 0
            for spool in self._files():
                left += spool.rows
                with contextlib.suppress(Exception):
                    spool.close(remove=not spool.rows)
            self._own, self._adopted, self._rows = None, [], {}
        if left:
            logger.info(LOG_SPOOL_LEFT, left, self.directory)
        return left


def _set_aside_path(path: str, error: BaseException) -> None:
    aside = f"{path}.{int(time.time())}.corrupt"
    try:
        os.rename(path, aside)
    except OSError:
        return  # gone already, or another process set it aside first
    _rename(path + "-wal", aside + "-wal")
    _rename(path + "-shm", aside + "-shm")
    logger.warning(LOG_SPOOL_CORRUPT, path, f"{type(error).__name__}: {error}", aside)


def _unlink(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _rename(path: str, new: str) -> None:
    with contextlib.suppress(OSError):
        os.rename(path, new)
