"""The on-disk spool: every batch on disk from its hand-over until Koala accepts it.

Off unless ``spool_dir`` (or ``KOALA_SPOOL_DIR``) is set; then :class:`Spool`, else
:class:`NoSpool`, which the sender calls the same way. Each process writes its own SQLite
databases in that directory (WAL journal, ``synchronous=NORMAL``: a commit is in the
operating system's hands before the hand-over returns, so it survives the process being
killed, ``kill -9`` and OOM included; a power cut may lose the last moments, never the
file's consistency). A file is opened with SQLite's exclusive locking mode, so it stays
locked while its process lives and the kernel releases the lock when the process dies,
however it dies.

Each file belongs to one app: its name carries a digest of the app's Koala URL (API URL
and public key) and the file records that URL. A process adopts only files of its own app
whose lock it can take (their owner is gone): it keeps the lock, delivers their batches
like its own, and deletes each file once it is empty. Taking the lock is the only way in,
so two processes sharing the directory never deliver the same batch twice; files of other
apps are left alone (reported once). A file that cannot be opened or written *now* (full
disk, another user's file, a lock) is left for a later scan; only a file that is provably
not a database is set aside as ``*.corrupt``. Symlinks and other non-regular files are
never opened.

Request threads do one thing here: the committed insert. Files are created by the
constructing thread or the sender thread; the WAL is never checkpointed while hand-overs
write to it: after ``ROTATE_EVERY`` transactions the sender starts a new file for them and
checkpoints the old one (its fsyncs) holding only that file's lock.

After ``os.fork()`` the child never touches its parent's files (SQLite connections must not
cross a fork; even closing one there would disturb the parent's): its sender thread creates
the child's own file; hand-overs before that are written into it then.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from .._protocol import Batch
from . import _native

if TYPE_CHECKING:
    import sqlite3

logger = logging.getLogger("koala_middleware")

LOG_SPOOL_UNAVAILABLE = "the spool in %s cannot be written (%s); batches are kept in memory only"
LOG_SPOOL_CORRUPT = "%s is not a readable spool file (%s); set aside as %s"
LOG_SPOOL_ADOPTED = "adopted %d batch(es) left in %s by a process that is gone"
LOG_SPOOL_LEFT = "%d batch(es) left in the spool %s for the next process to deliver"
LOG_SPOOL_FOREIGN = "leaving %s alone: %s"
LOG_SPOOL_REPLACED = (
    "the spool file %s was removed or replaced under this process; "
    "recreated as %s with the %d batch(es) this process still held"
)

#: After this many transactions on the file hand-overs write to, the sender gives them a
#: new file and checkpoints the old one: its WAL (a page per hand-over) stays within a
#: few megabytes, and the checkpoint's fsyncs never hold up a hand-over.
ROTATE_EVERY = 1000
#: A file without its app record yet is being created (microseconds); one this old was
#: left by a process killed while creating it, and is removed.
STALE_INCOMPLETE = 600.0

PREFIX = "koala-spool-"
SUFFIX = ".sqlite3"
SCHEMA_VERSION = "2"

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE batches ("
    "id INTEGER PRIMARY KEY, path TEXT NOT NULL, user_agent TEXT NOT NULL, message_ids TEXT NOT NULL, "
    "body BLOB NOT NULL, due REAL)",  # due: NULL while in memory; else when to load it (monotonic)
)

#: Connections inherited from a parent process: never closed nor collected in the child.
_inherited: list[object] = []

#: "" stored; "pending" to be stored by the sender thread (see ``Spool.on_spooled``);
#: "spool_full" refused; "memory" the spool cannot be used (the batch is still deliverable).
AddResult = Literal["", "pending", "spool_full", "memory"]


def app_tag(app: str) -> str:
    """The part of a file name that says which app (Koala URL incl. public key) it is for."""
    return hashlib.sha256(app.encode()).hexdigest()[:12]


def _size(batch: Batch) -> int:
    return len(batch.body) + len(batch.user_agent) + 37 * batch.event_count + 64


def _identity(result: os.stat_result) -> tuple[int, int]:
    return result.st_dev, result.st_ino


def _is_corruption(error: BaseException) -> bool:
    """SQLite says the file is not a database, or a damaged one (not: locked, full,
    read-only, cannot open: those may pass)."""
    import sqlite3

    if not isinstance(error, sqlite3.DatabaseError) or isinstance(error, sqlite3.OperationalError):
        return False
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
    text = str(error).lower()
    return "not a database" in text or "malformed" in text


class SpoolFile:
    """One locked spool database: this process's own, or one adopted from a dead process.

    ``io`` serialises statements on it; the sender's checkpoint holds it (and nothing else).
    """

    def __init__(self, path: str, connection: sqlite3.Connection, identity: tuple[int, int], own: bool) -> None:
        self.path = path
        self.db = connection
        self.identity = identity
        self.own = own
        self.io = _native.Lock()
        self.rows = 0  # batches stored here, in memory or not
        self.writes = 0  # transactions since it was opened

    @classmethod
    def create(cls, directory: str, app: str) -> SpoolFile:
        """A new, locked file of ``app`` in ``directory``; raises OSError/sqlite3.Error."""
        import sqlite3

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{PREFIX}{app_tag(app)}-{os.getpid()}-{uuid.uuid4().hex[:12]}{SUFFIX}")
        # O_EXCL: a name of our own, never an existing file or a symlink planted there.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            identity = _identity(os.fstat(fd))
        finally:
            os.close(fd)
        # A sibling's scan may look at the empty file for a moment (it leaves files without
        # the app record alone): wait for it rather than fail.
        db = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")  # before WAL: no shared memory, one owner
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")  # the sender checkpoints: see Spool.rotate
            db.execute("BEGIN EXCLUSIVE")  # the lock, held from here until close
            for statement in _SCHEMA:
                db.execute(statement)
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [("app", app), ("version", SCHEMA_VERSION)])
            db.execute("COMMIT")
            db.execute("PRAGMA busy_timeout=0")
        except BaseException:
            db.close()
            _unlink(path, path + "-wal")
            raise
        return cls(path, db, identity, own=True)

    @classmethod
    def take_over(cls, path: str, app: str) -> SpoolFile | str:
        """Open and lock an existing file of ``app``; else why not (a log-ready phrase,
        prefixed ``"later: "`` when a later scan may succeed). Raises on corruption."""
        import sqlite3

        try:
            before = os.lstat(path)
        except OSError:
            return "later: gone"
        if not stat.S_ISREG(before.st_mode):
            return "not a regular file (a symlink?); spool files are never followed"
        try:
            db = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            return f"later: {error}"
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "meta" not in tables:
                db.close()
                if "batches" in tables:
                    return "written by an older version of koala-middleware, which did not say for which app"
                if not tables and time.time() - before.st_mtime > STALE_INCOMPLETE:
                    _unlink(path, path + "-wal")
                    return "an empty file left by a process killed while creating it; removed"
                return "later: not a complete spool file (yet)"
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("app") != app:
                db.close()
                return "another app's spool file (another public key or API URL)"
            if _identity(os.lstat(path)) != _identity(before):
                db.close()
                return "later: replaced while being opened"
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")
            db.execute("BEGIN EXCLUSIVE")
            db.execute("COMMIT")
            spool = cls(path, db, _identity(before), own=False)
            spool.rows = db.execute("SELECT count(*) FROM batches").fetchone()[0]
        except Exception as error:
            db.close()
            if _is_corruption(error):
                raise
            return f"later: {type(error).__name__}: {error}"  # alive (locked), full disk, read-only...
        return spool

    def insert(self, batch: Batch, due: float | None) -> int:
        with self.io:
            row = self.db.execute(
                "INSERT INTO batches (path, user_agent, message_ids, body, due) VALUES (?, ?, ?, ?, ?)",
                (batch.path, batch.user_agent, json.dumps(batch.message_ids), batch.body, due),
            ).lastrowid
            self.rows += 1
            self.writes += 1
        assert row is not None
        return row

    def delete(self, rows: list[int]) -> None:
        with self.io:
            self.db.execute("BEGIN")
            try:
                self.db.executemany("DELETE FROM batches WHERE id = ?", [(row,) for row in rows])
                self.db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    self.db.execute("ROLLBACK")
                raise
            self.rows -= len(rows)
            self.writes += 1

    def park(self, row: int, due: float) -> None:
        with self.io:
            self.db.execute("UPDATE batches SET due = ? WHERE id = ?", (due, row))
            self.writes += 1

    def load(self, now: float, limit: int) -> list[tuple[int, Batch]]:
        """Up to ``limit`` batches due by ``now``, marked as in memory."""
        with self.io:
            rows = self.db.execute(
                "SELECT id, path, user_agent, message_ids, body FROM batches WHERE due <= ? ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
            if rows:
                self.db.execute("BEGIN")
                self.db.executemany("UPDATE batches SET due = NULL WHERE id = ?", [(row[0],) for row in rows])
                self.db.execute("COMMIT")
                self.writes += 1
        return [(row[0], _batch(*row[1:])) for row in rows]

    def all_rows(self) -> list[tuple[int, Batch, float | None]]:
        with self.io:
            rows = self.db.execute("SELECT id, path, user_agent, message_ids, body, due FROM batches").fetchall()
        return [(row[0], _batch(*row[1:5]), row[5]) for row in rows]

    def next_due(self) -> float | None:
        with self.io:
            due: float | None = self.db.execute("SELECT min(due) FROM batches WHERE due IS NOT NULL").fetchone()[0]
        return due

    def checkpoint(self) -> None:
        with self.io:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def replaced(self) -> bool:
        """Whether its path no longer names this file (removed, replaced, re-mounted)."""
        try:
            return _identity(os.lstat(self.path)) != self.identity
        except FileNotFoundError:
            return True
        except OSError:
            return False  # cannot tell now (permissions): assume not

    def close(self, remove: bool) -> None:
        """Release it; ``remove`` unlinks it first (so the close's own checkpoint is moot)."""
        if remove and not self.replaced():
            _unlink(self.path, self.path + "-wal", self.path + "-shm")
        with contextlib.suppress(Exception):
            self.db.close()


def _batch(path: object, user_agent: object, message_ids: object, body: object) -> Batch:
    if not (isinstance(path, str) and isinstance(user_agent, str) and isinstance(message_ids, str)):
        raise ValueError("a row with fields of the wrong type")
    if not isinstance(body, bytes):
        raise ValueError("a row whose body is not bytes")
    ids = json.loads(message_ids)  # a JSON list: a message_id may hold spaces
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError("a row whose message_ids are not a list of strings")
    return Batch(path, body, user_agent, tuple(ids))


class NoSpool:
    """No ``spool_dir``: what the sender calls on a spool, doing nothing."""

    enabled = False
    on_stranded: Callable[[int, bool], None] | None = None
    on_spooled: Callable[[int], None] | None = None

    @property
    def finished(self) -> int:
        return 0

    @property
    def needs_sync(self) -> bool:
        return False

    def prepare(self) -> None:
        """On the sender thread, before its first delivery."""

    def add(self, batch: Batch) -> AddResult:
        return "memory"

    def holds(self, batch: Batch) -> bool:
        return False

    def remove(self, batch: Batch) -> None:
        pass

    def sync(self) -> None:
        pass

    def park(self, batch: Batch, due: float) -> bool:
        return False

    def load(self, now: float, limit: int) -> tuple[list[Batch], float | None]:
        return [], None

    def scan(self) -> int:
        return 0

    def after_fork(self) -> None:
        pass

    def close(self) -> int:
        return 0


class Spool(NoSpool):
    """This process's spool files, the files it adopted, and which batch is in which row.

    Thread-safe: hand-overs (request threads) and the sender thread share ``_lock`` (an OS
    lock also under gevent, as the queue's) for the bookkeeping and short SQLite statements
    (no fsync: WAL with ``synchronous=NORMAL``); creating files, checkpoints and closing
    happen on the sender thread (or at construction) outside it.
    """

    enabled = True

    def __init__(self, directory: str, max_bytes: int, app: str) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.app = app
        #: ``on_stranded(count, lost)``: batches on disk only that this process can no longer
        #: load (their file turned out unreadable); ``lost`` when the file was set aside,
        #: else they stay in it for the process that adopts it once this one is gone.
        self.on_stranded = None
        #: ``on_spooled(count)``: batches handed over before the file existed, now written.
        self.on_spooled: Callable[[int], None] | None = None
        self._lock = _native.Lock()
        self._init_state()
        self._create_active()  # here, not on a request's thread

    def _init_state(self) -> None:
        self._active: SpoolFile | None = None  # where hand-overs write
        self._files: list[SpoolFile] = []  # every file open: the active one, older own ones, adopted ones
        self._early: list[Batch] = []  # handed over before the active file existed (forked child)
        self._rows: dict[Batch, tuple[SpoolFile, int]] = {}
        self._done: list[tuple[SpoolFile, int]] = []  # rows of finished batches, to delete
        self._bytes = 0
        self._broken = False  # cannot write: memory only from now on (logged once)
        self._unreadable: set[SpoolFile] = set()  # own files that failed a read: no more loading
        self._stranded: list[tuple[int, bool]] = []  # for on_stranded, outside the lock
        self._reported: set[str] = set()  # files left alone, logged once each
        self._closed = False
        self._pid = os.getpid()
        self._foreign: set[str] = set()  # a parent's files, in a forked child

    def after_fork(self) -> None:
        """In a forked child: forget the parent's files without closing them, and never
        try to adopt them (SQLite's in-process lock records came along with the fork)."""
        _inherited.extend(spool.db for spool in self._files)
        foreign = self._foreign | {spool.path for spool in self._files}
        self._lock = _native.Lock()
        self._init_state()
        self._foreign = foreign

    def _create_active(self) -> bool:
        try:
            created = SpoolFile.create(self.directory, self.app)
        except Exception as error:  # full disk, read-only volume, not a directory
            with self._lock:
                self._break(error)
            return False
        with self._lock:
            if self._closed:
                created.close(remove=True)
                return False
            self._active = created
            self._files.insert(0, created)
        return True

    @property
    def finished(self) -> int:
        """Batches removed but not deleted from disk yet."""
        return len(self._done)

    @property
    def needs_sync(self) -> bool:
        """Finished batches to delete, a file to start, or one to rotate."""
        active = self._active
        rotate = active is not None and active.writes >= ROTATE_EVERY and not self._broken
        return bool(self._done or self._early) or rotate

    # -- the request side ---------------------------------------------------------------

    def add(self, batch: Batch) -> AddResult:
        """Store ``batch`` durably; see :data:`AddResult`."""
        size = _size(batch)
        with self._lock:
            if self._closed or self._broken:
                return "memory"
            if self._bytes + size > self.max_bytes:
                return "spool_full"
            active = self._active
            if active is None:  # a forked child whose sender has not created its file yet
                self._early.append(batch)
                self._bytes += size
                return "pending"
            try:
                row = active.insert(batch, None)
            except Exception as error:  # full disk, read-only volume, vanished directory
                self._break(error)
                return "memory"
            self._rows[batch] = active, row
            self._bytes += size
            return ""

    def _break(self, error: BaseException) -> None:
        if not self._broken:
            self._broken = True
            logger.warning(LOG_SPOOL_UNAVAILABLE, self.directory, f"{type(error).__name__}: {error}")

    # -- the sender side ----------------------------------------------------------------

    def prepare(self) -> None:
        """The sender thread's start: a forked child's own file, with what came before it."""
        if self._active is None and not self._broken and not self._closed and os.getpid() == self._pid:
            self._create_active()
        self._write_early()

    def _write_early(self) -> None:
        written = 0
        with self._lock:
            early, self._early = self._early, []
            active = self._active
            for batch in early:
                if active is None:
                    self._bytes -= _size(batch)
                    continue
                try:
                    self._rows[batch] = active, active.insert(batch, None)
                    written += 1
                except Exception as error:
                    self._bytes -= _size(batch)
                    self._break(error)
        if written and self.on_spooled is not None:
            self.on_spooled(written)

    def holds(self, batch: Batch) -> bool:
        return batch in self._rows or batch in self._early

    def remove(self, batch: Batch) -> None:
        """``batch`` is done (delivered, or given up for good): off the disk at the next
        :meth:`sync`. Until then a crash would deliver it again; Koala deduplicates by
        ``message_id``."""
        with self._lock:
            place = self._rows.pop(batch, None)
            if place is None:
                if batch in self._early:
                    self._early.remove(batch)
                    self._bytes -= _size(batch)
                return
            if place[0].own:
                self._bytes -= _size(batch)
            self._done.append(place)

    def sync(self) -> None:
        """Delete the rows of finished batches, one transaction per file (the sender calls
        this when it has a moment: a delete per batch cost it a third of its throughput),
        close and delete files now empty, and give hand-overs a new file now and then."""
        if self._early:
            self._write_early()
        emptied: list[SpoolFile] = []
        with self._lock:
            done, self._done = self._done, []
            files: dict[SpoolFile, list[int]] = {}
            for spool, row in done:
                files.setdefault(spool, []).append(row)
            for spool, rows in files.items():
                if spool not in self._files:
                    continue  # set aside or recreated meanwhile
                try:
                    spool.delete(rows)
                except Exception as error:
                    # Kept for the next sync (a full disk may free up); close() removes a
                    # file whose every row is finished, so delivered batches are not sent again.
                    self._done.extend((spool, row) for row in rows)
                    self._set_aside_or_break(spool, error)
                    continue
                if not spool.rows and spool is not self._active:
                    self._files.remove(spool)
                    emptied.append(spool)
            active = self._active
            rotate = active is not None and active.writes >= ROTATE_EVERY and not self._broken
        for spool in emptied:
            spool.close(remove=True)
        if rotate and active is not None:
            self._rotate(active)
        self._report_stranded()

    def _rotate(self, old: SpoolFile) -> None:
        """A new file for hand-overs; then the old one's WAL checkpointed (its fsyncs)
        holding only its own lock, or the file deleted if nothing is left in it."""
        if not self._create_active():
            return
        with self._lock:
            empty = not old.rows
            if empty and old in self._files:
                self._files.remove(old)
        if empty:
            old.close(remove=True)
            return
        try:
            old.checkpoint()
        except Exception as error:
            with self._lock:
                self._set_aside_or_break(old, error)

    def park(self, batch: Batch, due: float) -> bool:
        """Keep ``batch`` on disk only, to load again at ``due`` (monotonic); False if it is
        not in the spool (then it is the caller's to give up)."""
        with self._lock:
            place = self._rows.pop(batch, None)
            if place is None:
                return False
            spool, row = place
            try:
                spool.park(row, due)
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
            for spool in list(self._files):
                if spool in self._unreadable:
                    continue
                try:
                    if len(loaded) < limit:
                        for row, batch in spool.load(now, limit - len(loaded)):
                            self._rows[batch] = spool, row
                            loaded.append(batch)
                    due = spool.next_due()
                except Exception as error:
                    if spool.own:  # its parked batches are out of reach now
                        self._unreadable.add(spool)
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

    def scan(self) -> int:
        """The periodic look at the directory (sender thread): recreate our files if they
        were removed or replaced, and adopt the files of this app's processes that are
        gone. Returns how many batches were adopted (all due now)."""
        if self._closed or os.getpid() != self._pid:
            return 0
        self._recreate_replaced()
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return 0
        with self._lock:
            mine = {spool.path for spool in self._files} | self._foreign
        ours = f"{PREFIX}{app_tag(self.app)}-"
        recovered = 0
        for name in names:
            path = os.path.join(self.directory, name)
            if not (name.startswith(PREFIX) and name.endswith(SUFFIX)) or path in mine:
                continue
            if not name.startswith(ours):
                self._leave(path, "another app's spool file (another public key or API URL), or an older version's")
                continue
            try:
                taken = SpoolFile.take_over(path, self.app)
            except Exception as error:  # provably not a database
                _set_aside_path(path, error)
                continue
            if isinstance(taken, str):
                if not taken.startswith("later: "):
                    self._leave(path, taken)
                continue
            if not taken.rows:
                taken.close(remove=True)
                continue
            try:
                with taken.io:
                    taken.db.execute("UPDATE batches SET due = 0")
            except Exception as error:
                taken.close(remove=False)  # left for a later scan (full disk...)
                logger.debug("cannot adopt %s now: %s", path, error)
                continue
            with self._lock:
                if self._closed:
                    taken.close(remove=False)
                    break
                self._files.append(taken)
            logger.info(LOG_SPOOL_ADOPTED, taken.rows, path)
            recovered += taken.rows
        return recovered

    def _leave(self, path: str, why: str) -> None:
        if path not in self._reported:
            self._reported.add(path)
            logger.info(LOG_SPOOL_FOREIGN, path, why)

    def _recreate_replaced(self) -> None:
        """Our files' paths must still name them: a removed directory (``rm -rf``, a tmp
        cleaner, a re-mount) would otherwise have us spool into unlinked files, lost at
        the next crash. Their rows (still readable through our connections) go into a new file."""
        with self._lock:
            gone = [spool for spool in self._files if spool.replaced()]
        if not gone or self._broken:
            return
        if not self._create_active():
            return
        with self._lock:
            active = self._active
            assert active is not None
            moved = 0
            for spool in gone:
                finished = {row for place, row in self._done if place is spool}
                try:
                    rows = [entry for entry in spool.all_rows() if entry[0] not in finished]
                except Exception as error:
                    self._set_aside_or_break(spool, error)
                    continue
                where = {row: batch for batch, (place, row) in self._rows.items() if place is spool}
                try:
                    for row, batch, due in rows:
                        new_row = active.insert(batch, due)
                        held = where.get(row)
                        if held is not None:
                            self._rows[held] = active, new_row
                        if not spool.own:
                            self._bytes += _size(batch)
                except Exception as error:
                    self._break(error)
                    return
                moved += len(rows)
                self._done = [place for place in self._done if place[0] is not spool]
                self._files.remove(spool)
                self._unreadable.discard(spool)
                spool.close(remove=False)
        logger.warning(LOG_SPOOL_REPLACED, gone[0].path, active.path, moved)

    def _set_aside_or_break(self, spool: SpoolFile, error: BaseException) -> None:
        """A statement failed (with ``_lock`` held): our own disk fails, or an adopted file
        turned out corrupt (set aside, its batches counted lost) or unusable for now."""
        if spool.own:
            self._break(error)
        elif _is_corruption(error) or isinstance(error, ValueError):
            self._stranded.append((self._disk_only(spool), True))
            self._files.remove(spool)
            self._rows = {batch: place for batch, place in self._rows.items() if place[0] is not spool}
            self._done = [place for place in self._done if place[0] is not spool]
            spool.close(remove=False)
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
            finished: dict[SpoolFile, int] = {}
            for spool, _ in self._done:
                finished[spool] = finished.get(spool, 0) + 1
            files, self._files, self._active, self._rows, self._done = self._files, [], None, {}, []
        for spool in files:
            remaining = spool.rows - finished.get(spool, 0)  # finished but not deleted: full disk
            left += max(remaining, 0)
            spool.close(remove=remaining <= 0)
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
