"""The on-disk spool in one process: bounds, a full queue, an unusable directory, shutdown
with Koala down, the environment variable, and fork. The crash and multi-process cases,
with real servers and kill -9, are in ``e2e/test_spool.py``."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from koala_middleware import KoalaClient
from koala_middleware._delivery._spool import LOG_SPOOL_UNAVAILABLE, PREFIX
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
