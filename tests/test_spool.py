"""The on-disk spool in one process: bounds, a full queue, an unusable directory, shutdown
with Koala down, the environment variable, and fork. The crash and multi-process cases,
with real servers and kill -9, are in ``e2e/test_spool.py``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from koala_middleware import KoalaClient
from koala_middleware._delivery import _spool
from koala_middleware._delivery._spool import LOG_SPOOL_REPLACED, LOG_SPOOL_UNAVAILABLE, PREFIX, SUFFIX, app_tag
from koala_middleware._protocol import Batch
from koala_middleware.testing import Collector

FAST = {"backoff_base": 0.05, "max_backoff": 0.2, "handle_sigterm": False}


def hand_over(client: KoalaClient, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        with client.tracker(profile_id=f"visitor-{n}") as tracker:
            tracker.track("Spooled", {"n": n})


def spool_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith(PREFIX) and name.endswith(".sqlite3"))


def numbers(koala: Collector) -> list[int]:
    return sorted(event["properties"]["n"] for event in koala.events())


def test_past_max_spool_bytes_new_batches_are_dropped_and_counted(tmp_path: Path) -> None:
    with Collector() as koala:
        koala.down()
        client = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), max_spool_bytes=2000, **FAST)
        hand_over(client, 20)
        stats = client.stats
        client.shutdown(0.2)
    assert 0 < stats.spooled < 20
    assert stats.dropped == {"spool_full": 20 - stats.spooled}, stats


def test_with_a_spool_a_full_queue_waits_on_disk_instead_of_dropping(tmp_path: Path) -> None:
    with Collector(delay=0.05) as koala:
        client = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), max_queue_batches=5, **FAST)
        hand_over(client, 40)
        assert client.stats.dropped == {}
        assert client.flush(20)
        stats = client.stats
        client.shutdown()
        assert numbers(koala) == list(range(40))
    assert stats.enqueued == stats.delivered == 40 and stats.queued == 0


def test_a_spool_that_cannot_be_written_warns_once_and_delivers_from_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with Collector() as koala, caplog.at_level(logging.WARNING, logger="koala_middleware"):
        client = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(blocker / "spool"), **FAST)
        hand_over(client, 5)
        assert client.flush(10)
        stats = client.stats
        client.shutdown()
        assert numbers(koala) == list(range(5))
    assert stats.spooled == 0 and stats.delivered == 5
    assert [r.msg for r in caplog.records].count(LOG_SPOOL_UNAVAILABLE) == 1


def test_shutdown_with_koala_down_leaves_the_batches_for_the_next_client(tmp_path: Path) -> None:
    with Collector() as koala:
        koala.down()
        first = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), **FAST)
        hand_over(first, 10)
        assert not first.shutdown(0.3)
        assert first.stats.dropped == {}, "left on disk, not lost"
        koala.up()
        second = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), **FAST)
        assert second.stats.recovered == 10
        assert second.flush(10)
        stats = second.stats
        second.shutdown()
        ids = koala.message_ids()
        assert numbers(koala) == list(range(10)) and len(ids) == len(set(ids))
    assert stats.delivered == 10 and stats.queued == 0
    assert spool_files(tmp_path) == [], "empty files are removed"


def test_koala_spool_dir_in_the_environment_turns_the_spool_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOALA_SPOOL_DIR", str(tmp_path))
    with Collector() as koala:
        koala.down()
        client = KoalaClient("pk_test", api_url=koala.url, **FAST)
        hand_over(client, 1)
        assert len(spool_files(tmp_path)) == 1 and client.stats.spooled == 1
        client.shutdown(0.1)


def test_spool_dir_must_be_a_path() -> None:
    with pytest.raises(TypeError, match="spool_dir must be a directory path"):
        KoalaClient("pk_test", spool_dir=42)  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_writes_its_own_spool_file(tmp_path: Path) -> None:
    with Collector() as koala:
        koala.down()
        client = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), **FAST)
        hand_over(client, 3)
        parent_file = spool_files(tmp_path)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its own file, its own batches; then it dies without a word
            try:
                hand_over(client, 2, start=100)
                # On disk once the child's sender thread has created its file (milliseconds).
                deadline = time.monotonic() + 5
                while client.stats.spooled < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.write(write, json.dumps(client.stats.spooled).encode())
            finally:
                os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        assert status == 0 and json.loads(os.read(read, 100)) == 2
        os.close(read)
        files = spool_files(tmp_path)
        assert len(files) == 2 and set(parent_file) < set(files)
        assert f"-{pid}-" in next(f for f in files if f not in parent_file)
        koala.up()
        assert client.flush(10)  # its own 3; the parent is alive, the child's file is not its
        client.shutdown()
        later = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), **FAST)
        assert later.stats.recovered == 2 and later.flush(10)
        later.shutdown()
        ids = koala.message_ids()
        assert numbers(koala) == [0, 1, 2, 100, 101] and len(ids) == len(set(ids))


# -- issue 20: each finding, reproduced in one process ------------------------------------


def app_of(koala: Collector, key: str = "pk_test") -> str:
    return f"{koala.url}/web/projects/{key}"


def leave_on_disk(koala: Collector, directory: Path, count: int, key: str = "pk_test") -> None:
    """A client that hands ``count`` batches over while Koala is down, then shuts down."""
    koala.down()
    client = KoalaClient(key, api_url=koala.url, spool_dir=str(directory), **FAST)
    hand_over(client, count)
    client.shutdown(0.2)
    koala.up()


class _Failing(sqlite3.Connection):
    """A connection whose statements matching ``failing`` raise as a full disk would."""

    failing: tuple[str, ...] = ()

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        if any(sql.startswith(prefix) for prefix in self.failing):
            raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        if any(sql.startswith(prefix) for prefix in self.failing):
            raise sqlite3.OperationalError("database or disk is full")
        return super().executemany(sql, *args)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Failing]]:
    """Connections opened from now on fail the statements listed in ``.failing``."""
    real = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return real(*args, factory=_Failing, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    _Failing.failing = ()
    yield _Failing
    _Failing.failing = ()


def test_a_file_that_cannot_be_written_at_adoption_is_left_for_a_later_scan(
    tmp_path: Path, full_disk: type[_Failing]
) -> None:
    """Issue 20.3: a full disk at adoption time set a healthy file aside as *.corrupt."""
    with Collector() as koala:
        leave_on_disk(koala, tmp_path, 10)
        full_disk.failing = ("UPDATE",)  # the adoption's first write
        client = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), **FAST)
        assert client.stats.recovered == 0
        assert not [name for name in os.listdir(tmp_path) if name.endswith(".corrupt")]
        full_disk.failing = ()
        client._sender._recover()  # the next periodic scan (on the sender thread, started here)
        client._sender._ensure_thread()
        assert client.stats.recovered == 10 and client.flush(10)
        client.shutdown()
        assert numbers(koala) == list(range(10))


def test_delivered_batches_are_not_sent_again_after_a_disk_full_fallback(
    tmp_path: Path, full_disk: type[_Failing]
) -> None:
    """Issue 20.9: deletes failing (full disk) left delivered batches for the next process."""
    with Collector() as koala:
        client = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), **FAST)
        full_disk.failing = ("DELETE",)
        koala.hang()  # nothing delivered (so nothing deleted) until all ten are on disk
        hand_over(client, 10)
        assert client.stats.spooled == 10, "precondition: on disk"
        koala.release()
        assert client.flush(10)
        client.shutdown()
        full_disk.failing = ()
        later = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), **FAST)
        assert later.stats.recovered == 0
        later.shutdown()
        assert numbers(koala) == list(range(10))


def test_a_spool_file_removed_under_its_process_is_recreated_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 20.4: after ``rm -rf`` of the directory the process spooled into unlinked files."""
    directory = tmp_path / "spool"
    with Collector() as koala, caplog.at_level(logging.WARNING, logger="koala_middleware"):
        koala.down()
        client = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(directory), **FAST)
        hand_over(client, 5)
        shutil.rmtree(directory)
        client._sender._recover()  # the periodic scan
        hand_over(client, 5, start=5)
        assert [r.msg for r in caplog.records].count(LOG_SPOOL_REPLACED) == 1
        assert len(spool_files(directory)) == 1
        client.shutdown(0.2)  # Koala down: all 10 stay on disk
        koala.up()
        later = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(directory), **FAST)
        assert later.stats.recovered == 10 and later.flush(10)
        later.shutdown()
        assert numbers(koala) == list(range(10))


def test_two_apps_sharing_a_spool_dir_adopt_only_their_own_files(tmp_path: Path) -> None:
    """Issue 20.7: app B adopted app A's batches and posted them under B's key."""
    with Collector() as koala:
        leave_on_disk(koala, tmp_path, 5, key="pk_app_a")
        other = KoalaClient("pk_app_b", api_url=koala.url, spool_dir=str(tmp_path), **FAST)
        assert other.stats.recovered == 0
        other.shutdown()
        owner = KoalaClient("pk_app_a", api_url=koala.url, spool_dir=str(tmp_path), **FAST)
        assert owner.stats.recovered == 5 and owner.flush(10)
        owner.shutdown()
        paths = {request.path for request in koala.requests()}
        assert paths == {"/web/projects/pk_app_a/batch"}, paths
        assert numbers(koala) == list(range(5))


def test_a_symlink_named_like_a_spool_file_is_never_opened(tmp_path: Path) -> None:
    """Issue 20.8: the client switched a symlink's target to WAL and added a table to it."""
    target = tmp_path / "app.db"
    database = sqlite3.connect(target)
    database.execute("CREATE TABLE users (name TEXT)")
    database.commit()
    database.close()
    spool = tmp_path / "spool"
    spool.mkdir()
    with Collector() as koala:
        (spool / f"{PREFIX}{app_tag(app_of(koala))}-1-planted{SUFFIX}").symlink_to(target)
        client = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(spool), **FAST)
        client.shutdown()
    database = sqlite3.connect(target)
    tables = {row[0] for row in database.execute("SELECT name FROM sqlite_master")}
    mode = database.execute("PRAGMA journal_mode").fetchone()[0]
    database.close()
    assert tables == {"users"} and mode == "delete"


def test_a_message_id_with_spaces_stays_one_event_after_a_reload(tmp_path: Path) -> None:
    """Issue 20.9: ids were stored space-separated, so "a b" came back as two events."""
    with Collector() as koala:
        koala.down()
        client = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), **FAST)
        body = json.dumps({"profile_id": "p", "events": [{"event": "E", "message_id": "id with spaces"}]})
        client._send(Batch("/batch", body.encode(), "ua", ("id with spaces",)))
        client.shutdown(0.2)
        koala.up()
        later = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), **FAST)
        assert later.flush(10)
        stats = later.stats
        later.shutdown()
    assert stats.recovered == 1 and stats.events_delivered == 1, stats


def test_the_spool_file_exists_before_the_first_hand_over(tmp_path: Path) -> None:
    """Issue 20.6: the first hand-over created the database on the request's thread."""
    client = KoalaClient("pk_test", api_url="http://127.0.0.1:9", spool_dir=str(tmp_path), **FAST)
    try:
        assert len(spool_files(tmp_path)) == 1
    finally:
        client.shutdown(0.1)


def test_hand_overs_move_to_a_new_file_instead_of_waiting_for_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20.6: the sender checkpointed (two fsyncs) holding the lock hand-overs need;
    now it gives them a new file and checkpoints the old one holding only its lock."""
    monkeypatch.setattr(_spool, "ROTATE_EVERY", 20)
    with Collector() as koala:
        koala.down()
        client = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), max_retries=0, **FAST)
        for start in range(0, 100, 10):
            hand_over(client, 10, start=start)
            time.sleep(0.05)  # the sender rotates when it has a moment
        assert len(spool_files(tmp_path)) > 1
        koala.up()
        assert client.flush(20)
        client.shutdown()
        ids = koala.message_ids()
        assert numbers(koala) == list(range(100)) and len(ids) == len(set(ids))
    assert spool_files(tmp_path) == []


def test_a_siblings_scan_never_takes_a_file_being_created(tmp_path: Path) -> None:
    """Issue 20.5: a file created under its final name could be locked and deleted by a
    sibling's scan before its creator locked it; now it is created O_EXCL and a scan leaves
    files without their app record alone."""
    app = "http://koala.test/web/projects/pk_test"
    scanner = _spool.Spool(str(tmp_path), 1 << 20, app)
    stop = threading.Event()

    def scan() -> None:
        while not stop.is_set():
            scanner.scan()

    thread = threading.Thread(target=scan)
    thread.start()
    try:
        for _ in range(300):
            created = _spool.SpoolFile.create(str(tmp_path), app)
            assert os.path.exists(created.path)
            created.insert(Batch("/batch", b"{}", "ua", ("m",)), None)
            created.close(remove=True)
    finally:
        stop.set()
        thread.join()
        scanner.close()
