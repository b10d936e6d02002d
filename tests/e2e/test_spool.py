"""The on-disk spool with real processes: kill -9 of gunicorn (master and workers) with 200
batches pending, an outage longer than the retry budget, two processes sharing one
``spool_dir``, and spool files that are not spools."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.servers import BIN, ROOT, free_port, wait_for_port, wait_until
from koala_middleware import KoalaClient
from koala_middleware._delivery._spool import LOG_SPOOL_CORRUPT, PREFIX, SUFFIX, SpoolFile, app_tag
from koala_middleware.testing import Collector

FAST = {"backoff_base": 0.05, "max_backoff": 0.2, "handle_sigterm": False}


def env_for(koala: Collector, **options: Any) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "KOALA_API_URL": koala.url,
        "FAULTS_CLIENT": json.dumps(options),
    }


def script(mode: str, count: int, koala: Collector, **options: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.apps.spool_script", mode, str(count)],
        cwd=ROOT,
        env=env_for(koala, **options),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def holding(count: int, koala: Collector, **options: Any) -> subprocess.Popen[str]:
    """A process with ``count`` batches on disk, alive until killed."""
    proc = script("hold", count, koala, **options)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.communicate(timeout=10)
    assert json.loads(line)["stats"]["spooled"] == count
    return proc


def app_of(koala: Collector, key: str = "pk_test") -> str:
    """What the spool keys its files to: the URL batches are posted under."""
    return f"{koala.url}/web/projects/{key}"


def numbers(koala: Collector) -> list[int]:
    return sorted(event["properties"]["n"] for event in koala.events())


def test_kill_9_of_gunicorn_preload_then_a_new_process_delivers_all_200_once(tmp_path: Path) -> None:
    spool = str(tmp_path / "spool")
    with Collector() as koala:
        koala.down()
        port = free_port()
        server = subprocess.Popen(
            [
                str(BIN / "gunicorn"),
                "--preload",
                "-w",
                "2",
                "-b",
                f"127.0.0.1:{port}",
                "tests.e2e.apps.faults_wsgi:app",
            ],
            cwd=ROOT,
            env=env_for(koala, spool_dir=spool, **FAST),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_port(port, server)  # type: ignore[arg-type]
            spooled: dict[int, int] = {}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                for n in range(200):
                    assert http.get("/track", params={"n": n}).status_code == 200

                def all_on_disk() -> bool:
                    stats = http.get("/stats").json()
                    spooled[stats["pid"]] = stats["spooled"]
                    return sum(spooled.values()) == 200

                assert wait_until(all_on_disk, timeout=20), spooled
            assert len(spooled) == 2, "precondition: both workers hold batches"
            assert not koala.requests(accepted_only=False)
        finally:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        koala.up()
        stats = result(script("deliver", 0, koala, spool_dir=spool, **FAST))
        ids = koala.message_ids()
        assert stats["flushed"] and stats["recovered"] == 200 and stats["delivered"] == 200, stats
        assert numbers(koala) == list(range(200))
        assert len(ids) == len(set(ids)) == 200
    assert not [name for name in os.listdir(spool) if name.startswith(PREFIX)], ("empty spool files are removed", stats)


def test_an_outage_longer_than_the_retry_budget_loses_nothing(tmp_path: Path) -> None:
    with Collector(status=503) as koala:
        client = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), max_retries=1, **FAST)
        for n in range(30):
            with client.tracker(profile_id=f"0000000{n:02d}") as tracker:
                tracker.track("Outage", {"n": n})
        attempts = lambda: len(koala.requests(accepted_only=False))  # noqa: E731
        assert wait_until(lambda: attempts() > 2 * 30, timeout=30), "every batch tried more than its budget"
        assert client.stats.dropped == {} and client.stats.queued == 30
        koala.answer_with(200)
        assert client.flush(20)
        stats = client.stats
        client.shutdown()
        assert numbers(koala) == list(range(30))
    assert stats.delivered == 30 and stats.dropped == {} and stats.queued == 0


def test_two_processes_sharing_a_spool_dir_never_deliver_the_same_batch_twice(tmp_path: Path) -> None:
    spool = str(tmp_path)
    with Collector() as koala:
        koala.down()
        dead = holding(100, koala, spool_dir=spool, **FAST)
        alive = holding(10, koala, spool_dir=spool, **FAST)
        dead.kill()
        dead.wait()
        koala.up()
        first, second = (script("deliver", 20, koala, spool_dir=spool, **FAST) for _ in range(2))
        results = [result(first), result(second)]
        # The dead process's 100, adopted by one or the other; the live one's 10 by neither
        # (it delivers them itself now that Koala is back).
        assert sum(r["recovered"] for r in results) == 100 and all(r["flushed"] for r in results), results
        assert wait_until(lambda: len(koala.message_ids()) >= 150)
        alive.kill()
        alive.wait()
        time.sleep(0.2)
        ids = koala.message_ids()
    assert len(ids) == len(set(ids)) == 150, results


def test_a_garbage_or_truncated_spool_file_is_set_aside_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Collector() as koala:
        garbage = tmp_path / f"{PREFIX}{app_tag(app_of(koala))}-1-garbage{SUFFIX}"
        garbage.write_bytes(b"not a database, " * 1000)
        spool = SpoolFile.create(str(tmp_path), app_of(koala))
        for _ in range(200):
            spool.db.execute(
                "INSERT INTO batches (path, user_agent, message_ids, body) VALUES ('/batch', 'ua', '[\"id\"]', ?)",
                (b"x" * 500,),
            )
        spool.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        spool.close(remove=False)
        truncated = Path(spool.path)
        truncated.write_bytes(truncated.read_bytes()[:6000])
        with caplog.at_level(logging.WARNING, logger="koala_middleware"):
            run_one_client(koala, tmp_path)
    warnings = [r for r in caplog.records if r.msg == LOG_SPOOL_CORRUPT]
    assert len(warnings) == 2, caplog.text
    names = sorted(os.listdir(tmp_path))
    assert not garbage.exists() and not truncated.exists(), names
    assert sum(name.endswith(".corrupt") for name in names) == 2, names


def run_one_client(koala: Collector, tmp_path: Path) -> None:
    """A client on that directory still records and delivers."""
    client = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), **FAST)
    with client.tracker(profile_id="still-works") as tracker:
        tracker.track("After")
    assert client.flush(10)
    client.shutdown()
    assert len(koala.events()) == 1


def test_a_spool_file_with_rows_it_cannot_read_is_set_aside_and_its_batches_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Collector() as koala, caplog.at_level(logging.WARNING, logger="koala_middleware"):
        odd = SpoolFile.create(str(tmp_path), app_of(koala))
        for body in (b'{"profile_id":"a","events":[]}', "a text body, not bytes"):
            odd.db.execute(
                "INSERT INTO batches (path, user_agent, message_ids, body) VALUES ('/batch', 'ua', '[\"id\"]', ?)",
                (body,),
            )
        odd.close(remove=False)
        client = KoalaClient("pk_test", api_url=koala.url, spool_dir=str(tmp_path), **FAST)
        assert client.flush(10), "never waits for batches it can no longer load"
        stats = client.stats
        client.shutdown()
    assert stats.recovered == 2 and stats.dropped == {"error": 2} and stats.queued == 0, stats
    assert [r.msg for r in caplog.records].count(LOG_SPOOL_CORRUPT) == 1
    assert sum(name.endswith(".corrupt") for name in os.listdir(tmp_path)) == 1


def chaos(key: str, mode: str, koala: Collector, spool: str) -> subprocess.Popen[str]:
    env = {**env_for(koala), "SPOOL_DIR": spool}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.apps.spool_chaos", key, mode],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_chaos_two_apps_many_processes_kill_9_nothing_missing_nothing_twice(tmp_path: Path) -> None:
    """Issue 20, must show: 16 writers of two apps sharing one directory, kill -9 mid-write,
    adopters killed mid-adoption, Koala down then up: every batch whose hand-over returned
    arrives once, under its own app's key."""
    spool = str(tmp_path)
    keys = ("pk_chaos_a", "pk_chaos_b")
    written: dict[tuple[str, int], list[str]] = {}  # (key, pid) -> the numbers it printed
    errors: list[str] = []
    with Collector() as koala:
        koala.down()
        for _wave in range(2):
            writers = [(key, chaos(key, "churn", koala, spool)) for key in keys for _ in range(4)]
            started = {proc.pid: proc.stdout.readline() if proc.stdout else "" for _, proc in writers}
            time.sleep(1.0)
            adopters = [chaos(key, "deliver", koala, spool) for key in keys]  # adopting while Koala is down
            time.sleep(0.5)
            for proc in [proc for _, proc in writers] + adopters:
                proc.kill()  # kill -9, mid-write and mid-adoption
            for key, proc in writers:
                out, err = proc.communicate()
                written[(key, proc.pid)] = (started[proc.pid] + out).split()
                errors.append(err)
            for proc in adopters:
                proc.communicate()
        koala.up()
        finals = [chaos(key, "deliver", koala, spool) for key in keys]
        results = []
        for proc in finals:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            results.append(json.loads(out.splitlines()[-1]))
        assert all(r["flushed"] for r in results), results
        received: dict[tuple[str, int, int], int] = {}
        for request in koala.requests():
            key = request.path.split("/")[3]
            for event in json.loads(request.body)["events"]:
                props = event["properties"]
                assert props["key"] == key, "posted under another app's key"
                ident = (key, props["pid"], props["n"])
                received[ident] = received.get(ident, 0) + 1
        ids = koala.message_ids()
    expected = {(key, pid, int(n)) for (key, pid), numbers_ in written.items() for n in numbers_}
    missing = expected - set(received)
    assert len(expected) > 16 * 20, ("precondition: the writers wrote", errors[-1][-2000:])
    assert not missing, f"{len(missing)} of {len(expected)} missing"
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicated"
    assert not [name for name in os.listdir(spool) if name.endswith(".corrupt")]
