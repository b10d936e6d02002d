"""The SIGTERM flush handler, in real processes: installed only where SIGTERM is at its
default action and the client is made in the main thread, never over someone else's
handler, off with ``handle_sigterm=False``; it delivers what is pending and the process
still dies of SIGTERM (status -15), even when the signal lands while the main thread holds
the sender's lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

import pytest

from e2e.servers import script_process
from koala_middleware.testing import Collector

SCRIPT = "tests.e2e.apps.sigterm_script"
OURS = "koala_middleware._signals._on_sigterm"


def start(mode: str, koala: Collector, **options: Any) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = script_process(SCRIPT, mode, env={"KOALA_API_URL": koala.url, "FAULTS_CLIENT": json.dumps(options)})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.communicate(timeout=10)
    return proc, json.loads(line)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=20)
    return proc.returncode, out, err


@pytest.mark.parametrize("mode", ["wait", "locked", "exit"])
def test_sigterm_delivers_what_is_pending_then_dies_of_sigterm(mode: str) -> None:
    with Collector(delay=0.5) as koala:
        proc, first = start(mode, koala, shutdown_timeout=5)
        assert first["handler"] == OURS
        if mode == "wait":
            assert koala.wait_for(5, accepted_only=False), "precondition: the 5 batches are in flight"
            proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc)
        assert code == -signal.SIGTERM, err
        assert len(set(koala.message_ids())) == 5, err


@pytest.mark.parametrize(("mode", "code"), [("local-exit", 0), ("local-sigterm", -signal.SIGTERM)])
def test_a_client_collected_with_batches_pending_is_still_flushed(mode: str, code: int) -> None:
    """A client made in a function that returned: exit and SIGTERM still deliver its batches."""
    with Collector(delay=0.5) as koala:
        proc, _ = start(mode, koala, shutdown_timeout=5)
        returncode, _, err = finish(proc)
        assert returncode == code, err
        assert len(set(koala.message_ids())) == 5, err


def test_sigterm_with_koala_down_at_the_signal_delivers_when_it_is_back() -> None:
    with Collector() as koala:
        koala.down()
        proc, first = start("wait", koala, shutdown_timeout=5, backoff_base=0.1, max_backoff=0.2)
        assert first["handler"] == OURS
        proc.send_signal(signal.SIGTERM)
        koala.up()
        code, _, err = finish(proc)
        assert code == -signal.SIGTERM, err
        assert len(set(koala.message_ids())) == 5, err


def test_a_handler_installed_before_the_client_is_kept() -> None:
    with Collector() as koala:
        proc, first = start("own-handler", koala)
        assert first["handler"] == "__main__.theirs"
        proc.send_signal(signal.SIGTERM)
        code, out, err = finish(proc)
    assert code == 3 and '"theirs"' in out, err


@pytest.mark.parametrize(
    ("mode", "options"),
    [("thread", {}), ("wait", {"handle_sigterm": False}), ("wait", {"sync": True}), ("wait", {"dry_run": True})],
)
def test_no_handler_off_the_main_thread_when_turned_off_or_with_nothing_to_flush(
    mode: str, options: dict[str, Any]
) -> None:
    with Collector() as koala:
        proc, first = start(mode, koala, **options)
        assert first["handler"] == "default"
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc)
    assert code == -signal.SIGTERM, err


def test_an_app_handler_chaining_to_ours_runs_once() -> None:
    """Issue 20.9: the flush re-signalled the main thread, so a chaining handler ran twice."""
    with Collector() as koala:
        proc, first = start("chained", koala, shutdown_timeout=5)
        assert first["handler"] == "__main__.chaining"
        proc.send_signal(signal.SIGTERM)
        code, out, err = finish(proc)
        assert code == 128 + signal.SIGTERM, err
        assert out.count('"chaining"') == 1, out
        assert len(set(koala.message_ids())) == 5, err


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds the threads in /proc (Linux)")
def test_sigterm_taken_by_the_senders_thread_still_flushes_and_ends_the_process() -> None:
    """The kernel gives a process's signal to any one thread that does not block it, and
    Python runs the handler only when the main thread next runs Python code: a SIGTERM
    taken by the sender's thread while the main thread sleeps (here 60 s) used to go
    unhandled for the whole sleep. The sender's thread blocks signals, so the kernel gives it
    to the main thread. ``kill(tid)`` offers the signal to that thread first."""
    with Collector() as koala:
        proc, first = start("wait", koala, shutdown_timeout=5)
        assert first["handler"] == OURS
        assert koala.wait_for(5, accepted_only=False)
        others = sorted(int(tid) for tid in os.listdir(f"/proc/{proc.pid}/task") if int(tid) != proc.pid)
        assert others, "precondition: the sender's thread runs"
        os.kill(others[0], signal.SIGTERM)
        code, _, err = finish(proc)
        assert code == -signal.SIGTERM, err
        assert len(set(koala.message_ids())) == 5, err
